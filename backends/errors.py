"""Errors the backends raise. They are their own classes so the backends stand alone
(nothing here imports mlxbuild); the build reports any of them as one line."""


class BackendError(Exception):
    """This backend cannot do what was asked (a host without its toolchain, an option or
    a model it cannot lower); the message says what and, where it can, what to do."""
