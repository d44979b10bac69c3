"""What an ExecuTorch runtime must have to load a program: read from the program itself.

A ``.pte`` names every operator it calls outside its delegates and every delegate it
calls. Each operator namespace lives in a kernel library that the runtime must link (C++)
or import (Python) before loading; each delegate needs its backend registered; external
constants need their ``.ptd`` passed along. Missing any of them fails at load time
(``Missing operator: llama::update_cache.out``), so the record says which.

Facts of ExecuTorch 1.5.1. Torch-free: reads the summary ``mlxbuild inspect`` makes.
"""

from __future__ import annotations

# namespace → the library that registers its kernels: the Python module whose import
# loads it into the pybindings runtime, and the CMake target an app links (whole-archive).
KERNEL_LIBRARIES = {
    "aten": {"library": "portable kernels", "python_import": None,  # built into the pybindings
             "cmake_target": "portable_ops_lib (or optimized_native_cpu_ops_lib)"},
    "dim_order_ops": {"library": "portable kernels", "python_import": None,
                      "cmake_target": "portable_ops_lib (or optimized_native_cpu_ops_lib)"},
    "llama": {"library": "LLM custom ops", "python_import": "executorch.extension.llm.custom_ops.custom_ops",
              "cmake_target": "custom_ops"},
    "quantized_decomposed": {"library": "quantized kernels", "python_import": "executorch.kernels.quantized",
                             "cmake_target": "quantized_ops_lib"},
}
# Operators the runtime itself provides (no kernel library).
BUILT_IN = ("executorch_prim",)

# delegate id → the backend library, and whether ExecuTorch's Linux Python wheel has it.
BACKENDS = {
    "XnnpackBackend": {"cmake_target": "xnnpack_backend", "in_linux_wheel": True},
    "MLXBackend": {"cmake_target": "mlxdelegate (Apple silicon; EXECUTORCH_BUILD_MLX)", "in_linux_wheel": False},
    "CoreMLBackend": {"cmake_target": "coremldelegate (Apple platforms)", "in_linux_wheel": False},
    "VulkanBackend": {"cmake_target": "vulkan_backend", "in_linux_wheel": False},
    "CudaBackend": {"cmake_target": "aoti_cuda_backend (EXECUTORCH_BUILD_CUDA)", "in_linux_wheel": False},
}


def runtime_requirements(methods: dict, data_files: list[str] = ()) -> dict:
    """``methods``: ``{name: {"operators": [...], "delegates": [{"backend_id": ...}]}}`` as
    ``mlxbuild.pte_inspect.inspect_pte`` reports them; ``data_files``: the ``.ptd`` files
    published beside the program (named relative to it)."""
    ops: dict[str, set[str]] = {}
    for method in methods.values():
        for op in method.get("operators", []):
            namespace = op.split("::", 1)[0] if "::" in op else "aten"
            ops.setdefault(namespace, set()).add(op)
    libraries, unknown = [], []
    for namespace in sorted(ops):
        if namespace in BUILT_IN:
            continue
        lib = KERNEL_LIBRARIES.get(namespace)
        if lib is None:
            unknown.append(namespace)
            continue
        libraries.append({"namespace": namespace, **lib, "operators": sorted(ops[namespace])})
    delegates = sorted({d["backend_id"] for m in methods.values() for d in m.get("delegates", [])})
    backends = [{"backend_id": b, **BACKENDS.get(b, {"cmake_target": None, "in_linux_wheel": False})}
                for b in delegates]
    imports = sorted({lib["python_import"] for lib in libraries if lib["python_import"]})
    return {
        "kernel_libraries": libraries,
        "backends": backends,
        "data_files": list(data_files),
        # What `executorch.runtime` (Python) needs imported before it loads the program.
        "python_imports": imports,
        "unknown_operator_namespaces": unknown,
    }


def describe(req: dict) -> list[str]:
    """A few lines for ``mlxbuild inspect`` and the model card."""
    lines = []
    for lib in req["kernel_libraries"]:
        how = f"import {lib['python_import']}" if lib["python_import"] else "in the Python runtime"
        lines.append(f"kernels {lib['namespace']}:: ({len(lib['operators'])} ops): {lib['library']}; "
                     f"Python: {how}; C++: link {lib['cmake_target']}")
    for b in req["backends"]:
        where = "in ExecuTorch's Linux wheel" if b["in_linux_wheel"] else "not in ExecuTorch's Linux wheel"
        lines.append(f"backend {b['backend_id']}: C++: link {b['cmake_target']}; {where}")
    for f in req["data_files"]:
        lines.append(f"data file: {f} (pass it with the program)")
    for ns in req.get("unknown_operator_namespaces", []):
        lines.append(f"kernels {ns}::: a library mlxbuild does not know; link what registers them")
    return lines or ["nothing beyond the ExecuTorch runtime"]
