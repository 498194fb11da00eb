"""Python's text encoding, for what reads text without naming one (torch's inductor does).

Every read and write of autoseg names ``encoding="utf-8"``, and the processes it starts run
with ``PYTHONUTF8=1``. Code we do not own may still rely on the locale: torch.compile's inductor
reads its UTF-8 kernel templates with the preferred encoding and dies with
``UnicodeDecodeError: 'ascii' codec`` where that is ASCII. Python's C-locale coercion and
UTF-8 mode hide an ASCII ``C``/``POSIX`` locale, but not when UTF-8 mode is turned off
(``PYTHONUTF8=0``) and ``LC_ALL=C`` (or ``PYTHONCOERCECLOCALE=0``) keeps the C locale, nor
under a non-UTF-8 locale such as ``en_US.ISO-8859-1``.
"""

from __future__ import annotations

import codecs
import locale
import sys

from autoseg.common.errors import AutosegError

FIX = "set PYTHONUTF8=1 (or a UTF-8 locale, e.g. LC_ALL=C.UTF-8)"


def preferred_encoding() -> str:
    """The encoding ``open()`` uses when none is named (``utf-8`` in UTF-8 mode)."""
    return "utf-8" if sys.flags.utf8_mode else locale.getpreferredencoding(False)


def is_utf8(encoding: str) -> bool:
    try:
        return codecs.lookup(encoding).name == "utf-8"
    except LookupError:
        return False


def require_utf8_for_compile() -> None:
    """One line instead of inductor's UnicodeDecodeError mid-run, when the text encoding is not UTF-8."""
    encoding = preferred_encoding()
    if not is_utf8(encoding):
        raise AutosegError(f"torch.compile needs a UTF-8 text encoding but Python's is {encoding!r}: {FIX}, "
                           "or train with --set compile=false", where="compile")
