"""Which key opens a checkpoint's sealed files, and the place each file is bound to (:mod:`medsyngan.sealed`).

A reader tries, in order, the key it was given (``--key FILE``), the key file that the ``config.toml`` of the
checkpoint's run names (``privacy.checkpoint_key``), and the run's own key file (``RUN/keys/checkpoint.key``, made
by a DP run without a checkpoint key to seal its secrets). Whatever opens the file, it must be bound to that run's
id, the step in its folder's name and its role.
"""

from __future__ import annotations

from pathlib import Path

from medsyngan.errors import UserError
from medsyngan.rundir import RunDir
from medsyngan.sealed import Binding, IntegrityError, decrypt_at_rest, is_encrypted, load_key_file

RUN_KEY = Path("keys") / "checkpoint.key"  # in the run directory, never inside checkpoints/


def role(name: str) -> str:
    """A sealed checkpoint file's role: what it is, not its path, so a checkpoint folder can be copied or a lone
    model.safetensors renamed, but weights cannot be passed off as training state."""
    return f"checkpoint/{name}"


class KeyRing:
    """Opens the files of one checkpoint: plain ones as they are, sealed ones with the caller's key, else the key
    file named by the ``config.toml`` of ``run``, else that run's own key file (looked up at the first sealed
    file). A sealed file must be bound to ``run``'s id and ``step``; a lone file outside a checkpoint folder
    (``run`` and ``step`` None) is held to its role only."""

    def __init__(self, key: bytes | None, run: RunDir | None, step: int | None):
        self.run, self.step = run, step
        self._given = [(key, "the key given")] if key is not None else []
        self._from_run: list[tuple[bytes, str]] | None = None
        self._run_problem = ""

    def _run_keys(self) -> list[tuple[bytes, str]]:
        if self.run is None:
            return []
        keys = []
        key_file = self.run.load_config().privacy.checkpoint_key if self.run.config_path.is_file() else ""
        if key_file:
            where = f"key file {key_file} (privacy.checkpoint_key of {self.run.config_path})"
            if Path(key_file).is_file():
                keys.append((load_key_file(key_file), where))
            else:
                self._run_problem = f"; its run names {where}, which is not found here"
        own = self.run.root / RUN_KEY
        if own.is_file():
            keys.append((load_key_file(own), f"the run's own key file {own}"))
        return keys

    def _binding(self, name: str) -> Binding:
        run_id = None
        if self.run is not None and self.run.run_id_path.is_file():
            run_id = self.run.run_id()
        return Binding(run_id, self.step, role(name))

    def open(self, file: Path, name: str) -> bytes:
        """The plaintext of ``file``, a checkpoint's ``name`` (model.safetensors, …); a sealed file of another
        run, step or role, or one no key opens, is a one-line UserError; a damaged one an IntegrityError."""
        blob = file.read_bytes()
        if not is_encrypted(blob):
            return blob
        if self._from_run is None:
            self._from_run = self._run_keys()
        keys = self._given + self._from_run
        if not keys:
            raise UserError(f"checkpoint {file} is encrypted; pass --key FILE, the key file it was written with "
                            f"(privacy.checkpoint_key of its run, or its run's {RUN_KEY}){self._run_problem}")
        for key, _ in keys:
            try:
                return decrypt_at_rest(blob, key, self._binding(name))
            except IntegrityError as exc:
                if exc.reason == "malformed":
                    raise  # the caller's: a damaged checkpoint
                if exc.reason != "wrong-key":
                    raise UserError(f"checkpoint {file} is refused: {exc}; a file was moved in from another run, "
                                    "step or role, so restore the run's own file or delete this checkpoint") from None
        tried = " or ".join(name for _, name in keys)
        raise UserError(f"checkpoint {file} does not decrypt with {tried}: wrong key file, or the file was altered; "
                        f"pass the key file it was written with (--key FILE){self._run_problem}")
