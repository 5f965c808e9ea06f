"""What an integration swapped in a framework, so that its ``unpatch_*()`` puts every original back.

Each framework module (trl, verl, openrlhf, llamafactory) holds one :class:`Patches`: the
originals it replaced (the first one seen: patching twice keeps the framework's own), the
settings its replacements read at call time, and the fallbacks it has already warned about
(one warning per reason, not one per training step).
"""

import warnings
from typing import Any, Dict, Optional, Tuple


class Patches:
    """The attributes one integration replaced, keyed by a name of its choosing."""

    def __init__(self):
        self._saved: Dict[str, Tuple[Any, str, Any]] = {}  # key -> (owner, attribute, original)
        self._warned = set()
        self.settings: Optional[dict] = None  # what the replacements run with (impl, memory_budget, ...)

    def swap(self, owner, attribute: str, replacement, key: Optional[str] = None) -> None:
        """``owner.attribute = replacement`` (a class or a module), remembering the original under ``key``.

        The original is read from ``owner``'s own namespace, so a method inherited from a base
        class is restored by deleting nothing and rebinding exactly what was there.
        """
        key = attribute if key is None else key
        if key not in self._saved:
            self._saved[key] = (owner, attribute, vars(owner)[attribute])
        setattr(owner, attribute, replacement)

    def original(self, key: str):
        """The framework's own attribute that ``key`` replaced."""
        return self._saved[key][2]

    def holds(self, *keys: str) -> bool:
        """Whether any of ``keys`` (any key at all when none are named) is swapped now."""
        return any(key in self._saved for key in keys) if keys else bool(self._saved)

    def restore(self) -> None:
        """Put every original back and forget the settings (a no-op when nothing is swapped)."""
        for owner, attribute, original in self._saved.values():
            setattr(owner, attribute, original)
        self._saved.clear()
        self.settings = None

    def warn_fallback(self, reason: str, runs_instead: str) -> None:
        """Warn once per (reason, code) that a call runs the framework's own code, ``runs_instead``."""
        if (reason, runs_instead) in self._warned:
            return
        self._warned.add((reason, runs_instead))
        # stacklevel 3: the warning points at whoever called the replacement that fell back.
        warnings.warn(f"dpo-fast: {reason} is not supported; this call runs {runs_instead}", stacklevel=3)

    def rearm_warnings(self) -> None:
        """Warn again about fallbacks already warned about (tests check each warning)."""
        self._warned.clear()
