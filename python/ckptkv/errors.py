"""The exceptions of ckptkv: one class per status of the C++ store.

Every class derives from :class:`Error` and from the built-in exception a
Python caller would expect (a missing tag is a ``LookupError``, a bad
argument a ``ValueError``), so ``except ckptkv.Error`` catches them all.
The message is the store's own: it names the tag, file or tensor at fault
and what would be valid.
"""


class Error(Exception):
    """Base of every error ckptkv raises."""


class NotFoundError(Error, LookupError):
    """A store, tag, file or tensor that does not exist."""

    def __str__(self):  # LookupError would quote the message
        return str(self.args[0]) if self.args else ""


class CorruptionError(Error):
    """Stored bytes that cannot be what ckptkv wrote; the value is not given."""


class InvalidArgumentError(Error, ValueError):
    """A value or name the caller gave that cannot be stored or used."""


class StoreIOError(Error, OSError):
    """The file system or a device failed."""


class AlreadyExistsError(Error, FileExistsError):
    """A tag that is already committed (and overwrite was not asked for)."""


class FailedPreconditionError(Error, RuntimeError):
    """A call out of order: save before begin, a closed store, ..."""


class BusyError(Error, RuntimeError):
    """Another process holds the store's write lock."""


class NotSupportedError(Error, NotImplementedError):
    """A store of a newer format, or an operation this build cannot do."""


class ResourceExhaustedError(Error, MemoryError):
    """Out of host or device memory."""


class UnknownClassError(Error, TypeError):
    """A saved object of a class that is not allowed (see ckptkv.allow)."""


# Status code name (store/status.cc CodeName) -> class.
BY_CODE = {
    "NotFound": NotFoundError,
    "Corruption": CorruptionError,
    "InvalidArgument": InvalidArgumentError,
    "IOError": StoreIOError,
    "AlreadyExists": AlreadyExistsError,
    "FailedPrecondition": FailedPreconditionError,
    "Busy": BusyError,
    "NotSupported": NotSupportedError,
    "ResourceExhausted": ResourceExhaustedError,
}

__all__ = ["Error", "UnknownClassError"] + [c.__name__ for c in BY_CODE.values()]
