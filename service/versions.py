"""The model versions a worker keeps registered with the model signals, so feedback for a
version published just before the served one still counts."""

from __future__ import annotations

from pathlib import Path

from ml_wsgi_metrics import signals
from ml_wsgi_metrics.profile import ReferenceProfile
from service.published import PROFILE_FILE

__all__ = ["LiveVersions"]


class LiveVersions:
    """Registered versions and their profiles: as many as the model signals'
    ``live_versions``; registering a newer one retires the oldest."""

    def __init__(self) -> None:
        self._profiles: dict[str, ReferenceProfile] = {}

    @property
    def live(self) -> list[str]:
        """The versions registered with the model signals (not retired), oldest first."""
        registered = set(signals.registered_models())
        return sorted((v for v, p in self._profiles.items() if p.key in registered), key=int)

    def register(self, version: str, profile: ReferenceProfile) -> None:
        """Register a version (which may retire the oldest) and forget the retired ones."""
        signals.register_model(profile)
        self._profiles[version] = profile
        registered = set(signals.registered_models())
        self._profiles = {v: p for v, p in self._profiles.items() if p.key in registered}

    def register_previous(self, root: Path, served: str) -> None:
        """Register the versions in ``root`` published just before ``served``."""
        older = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True)
        for number in [n for n in older if n < int(served)]:
            if len(self.live) >= signals.live_versions():
                break
            try:
                self.register(str(number), ReferenceProfile.load(root / str(number) / PROFILE_FILE))
            except (OSError, ValueError):
                continue  # unfinished, removed or retired: nothing to score feedback against

    def ensure_registered(self) -> None:
        """Register the live versions again if the signals were reconfigured meanwhile."""
        registered = set(signals.registered_models())
        for version, profile in list(self._profiles.items()):
            if profile.key not in registered:
                try:
                    signals.register_model(profile)
                except ValueError:  # retired meanwhile: another worker registered newer ones
                    del self._profiles[version]
