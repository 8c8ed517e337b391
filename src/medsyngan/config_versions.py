"""Versions of the configuration file format, and the migration of older files.

A configuration file (a run's ``config.toml``, a preset, the configuration a checkpoint embeds) carries a top-level
``version``: ``CONFIG_VERSION`` when MedSynGAN writes it. A file without one was written before versions existed and
is version 1. Reading a file of an older version applies the steps of ``MIGRATIONS`` in order, so run directories
written by an older MedSynGAN keep working (``train --resume``, ``generate``, ``evaluate``); a file of a newer
version is a one-line error naming both versions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from medsyngan.errors import UserError

log = logging.getLogger("medsyngan")


@dataclass(frozen=True)
class Migration:
    """What turns a configuration file of one version into the next. Keys are dotted (``section.key``)."""

    why: str  # logged when a file is migrated
    renamed: dict[str, str] = field(default_factory=dict)  # old key → new key, value kept
    removed: tuple[str, ...] = ()  # settings that no longer exist; dropped
    copied: dict[str, str] = field(default_factory=dict)  # existing key → new key that starts with its value
    kept_defaults: dict[str, Any] = field(default_factory=dict)  # key → its old default, for a file that omits it


# MIGRATIONS[v] upgrades a version-v file to version v + 1; CONFIG_VERSION is the version written today.
MIGRATIONS: dict[int, Migration] = {
    1: Migration("data.seed takes run.seed, which drew the data (phantoms, partition, held-out patients) before it",
                 copied={"run.seed": "data.seed"}),
    2: Migration("train.kimg_per_phase defaults to the paper's 600 kimg; a file that does not set it keeps 60",
                 kept_defaults={"train.kimg_per_phase": 60.0}),
}
CONFIG_VERSION = max(MIGRATIONS) + 1


def _locate(tree: dict[str, Any], dotted: str) -> tuple[dict[str, Any], str] | None:
    """The table holding ``dotted`` and its last key, or None when the file does not set it."""
    *sections, key = dotted.split(".")
    node = tree
    for section in sections:
        node = node.get(section)
        if not isinstance(node, dict):
            return None
    return (node, key) if key in node else None


def _put(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``dotted`` unless the file already sets it (an explicit value wins over a migrated one)."""
    *sections, key = dotted.split(".")
    node = tree
    for section in sections:
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            return  # validation names the section that is a value
    node.setdefault(key, value)


def migrate(tree: dict[str, Any], origin: str) -> dict[str, Any]:
    """``tree`` (a parsed configuration file, changed in place) upgraded to CONFIG_VERSION, without ``version``."""
    version = tree.pop("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"{origin}: version = {version!r} is not a configuration version; it is a whole number ≥ 1")
    if version > CONFIG_VERSION:
        raise UserError(f"{origin}: configuration version {version} is newer than this MedSynGAN reads (version "
                        f"{CONFIG_VERSION}); upgrade medsyngan to read it")
    for step in range(version, CONFIG_VERSION):
        migration = MIGRATIONS[step]
        for old, new in migration.renamed.items():
            if found := _locate(tree, old):
                _put(tree, new, found[0].pop(found[1]))
        for old in migration.removed:
            if found := _locate(tree, old):
                del found[0][found[1]]
        for source, new in migration.copied.items():
            if found := _locate(tree, source):
                _put(tree, new, found[0][found[1]])
        for key, value in migration.kept_defaults.items():
            _put(tree, key, value)
    if version < CONFIG_VERSION:
        why = "; ".join(MIGRATIONS[step].why for step in range(version, CONFIG_VERSION))
        log.info("%s: configuration version %d read as version %d (%s)", origin, version, CONFIG_VERSION, why)
    return tree
