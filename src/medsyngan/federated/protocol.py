"""What travels between the aggregator and a hospital: typed messages, each with ``to_record`` / ``from_record``
over Flower records. No other module reads a record's keys.

Every instruction carries the :class:`Job` (the resolved configuration, a few KB of TOML, so a hospital whose
process restarted can rebuild its trainer from the message alone); instructions that belong to a round add a
:class:`RoundInstruction`, and some add tensors. A hospital's persistent state comes from ``context.state`` or its
own disk, never from the message.

Message types (Flower's ``message_type``), instruction → reply:
  ``query.hello``             job → :class:`Hello` (hospital id, training images and patients; the roster)
  ``query.secagg_advertise``  round with :class:`SecAggTerms` → :class:`KeyAdvertReply` (signed)
  ``query.secagg_share``      round with every hospital's signed key advert (and the job's signed roster to
                              check them against) → :class:`SharesReply`
  ``train``                   round (with the hospital's share inbox under secure aggregation) and the global
                              shared networks → :class:`TrainReply` (Δ of the shared networks, the hospital's
                              own privacy report)
  ``query.secagg_unmask``     round with the survivors → :class:`RevealsReply`
  ``evaluate``                job and the global generator → :class:`EvaluationReply` (held-out scalars)

A record that lacks a field or holds the wrong type raises :class:`MalformedMessage`, one line naming what is
wrong: the server counts that hospital as missing for the stage, a hospital answers with an error reply.

About 430 lines: every message type and its parsing sit together, so that no other module reads a record's keys.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from medsyngan.federated.advert_signing import AdvertSignature
from medsyngan.federated.records import record_to_state, state_to_record
from medsyngan.privacy.secagg import SHARE_BYTES, KeyAdvert, SecAggConfig

HELLO = "query.hello"
SECAGG_ADVERTISE = "query.secagg_advertise"
SECAGG_SHARE = "query.secagg_share"
SECAGG_UNMASK = "query.secagg_unmask"
TRAIN = "train"
EVALUATE = "evaluate"
PUBLIC_KEY_BYTES = 32
#: The error code of a hospital's reply when its own privacy policy refuses the instruction.
REFUSAL_CODE = 4003


class MalformedMessage(ValueError):
    """A record that does not carry what its message type promises."""


@contextmanager
def _parsing(what: str) -> Iterator[None]:
    try:
        yield
    except MalformedMessage:
        raise
    except KeyError as exc:
        raise MalformedMessage(f"malformed {what}: no {exc}") from None
    except (TypeError, ValueError, IndexError, AttributeError, OverflowError) as exc:
        raise MalformedMessage(f"malformed {what}: {exc}") from None


T = TypeVar("T")


def _get(record: Mapping[str, Any], key: str, kind: type[T] | tuple[type, ...]) -> T:
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise TypeError(f"{key} is {type(value).__name__}")
    return value  # type: ignore[return-value]


def _optional(record: Mapping[str, Any], key: str, kind: type[T]) -> T | None:
    return _get(record, key, kind) if key in record else None


def _ints(record: Mapping[str, Any], key: str) -> list[int]:
    return [int(_check(v, int, key)) for v in _get(record, key, list)]


def _blobs(record: Mapping[str, Any], key: str) -> list[bytes]:
    return [bytes(_check(v, bytes, key)) for v in _get(record, key, list)]


def _check(value: Any, kind: type, key: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{key} holds {type(value).__name__} values")
    return value


def _pairs(record: Mapping[str, Any], ids: str, values: str, read: Callable[[Mapping[str, Any], str], list]) -> dict:
    keys, items = _ints(record, ids), read(record, values)
    if len(keys) != len(items):
        raise ValueError(f"{ids} and {values} differ in length")
    return dict(zip(keys, items))


# --- instructions ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """The static part of every instruction of one federation."""

    config: str  # the resolved configuration, TOML
    run_id: str  # stable across resumes: salts the encryption, names hospitals' state folders
    partition: str | None = None  # simulation: the partition file that assigns images to virtual hospitals
    state_dir: str | None = None  # simulation: where virtual hospitals keep their round state
    state_key: str | None = None  # simulation: the key file that seals that state
    aggregator_public: bytes | None = None  # the aggregator's X25519 identity, when updates are encrypted
    roster: bytes | None = None  # the federation's signed roster (advert_signing.SignedRoster), under secure aggregation
    signing_keys: str | None = None  # simulation: the folder of the virtual hospitals' keys and the federation key

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({k: v for k, v in dataclasses.asdict(self).items() if v is not None})

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "Job":
        with _parsing("job"):
            return cls(config=_get(record, "config", str), run_id=_get(record, "run_id", str),
                       partition=_optional(record, "partition", str), state_dir=_optional(record, "state_dir", str),
                       state_key=_optional(record, "state_key", str),
                       aggregator_public=_optional(record, "aggregator_public", bytes),
                       roster=_optional(record, "roster", bytes), signing_keys=_optional(record, "signing_keys", str))

    def to_json(self) -> str:
        """The job as a file a ServerApp started elsewhere can read (bytes as hex)."""
        fields = {k: v.hex() if isinstance(v, bytes) else v for k, v in dataclasses.asdict(self).items()}
        return json.dumps({k: v for k, v in fields.items() if v is not None}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Job":
        with _parsing("job file"):
            fields = json.loads(text)
            for name in ("aggregator_public", "roster"):
                if name in fields:
                    fields[name] = bytes.fromhex(_get(fields, name, str))
            return cls.from_record(fields)


@dataclass(frozen=True)
class SecAggTerms:
    """A secure-aggregation round's public parameters, sent with every stage's instruction."""

    ids: tuple[int, ...]
    threshold: int
    ring_bits: int
    length: int
    neighbours: int
    context: bytes
    scales: tuple[float, ...]  # the quantization scale of each tensor, shared by every hospital of the round

    @classmethod
    def of(cls, config: SecAggConfig, scales: np.ndarray) -> "SecAggTerms":
        return cls(tuple(config.ids), config.threshold, config.ring_bits, config.length, config.neighbours,
                   config.context, tuple(float(x) for x in scales))

    def secagg_config(self) -> SecAggConfig:
        return SecAggConfig(ids=self.ids, threshold=self.threshold, ring_bits=self.ring_bits, length=self.length,
                            neighbours=self.neighbours, context=self.context)

    @property
    def scale_array(self) -> np.ndarray:
        return np.asarray(self.scales, np.float64)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({"ids": list(self.ids), "threshold": self.threshold, "ring_bits": self.ring_bits,
                             "length": self.length, "neighbours": self.neighbours, "context": self.context,
                             "scales": list(self.scales)})

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "SecAggTerms":
        with _parsing("secure-aggregation terms"):
            scales = [float(_check(v, float, "scales")) for v in _get(record, "scales", list)]
            return cls(tuple(_ints(record, "ids")), _get(record, "threshold", int), _get(record, "ring_bits", int),
                       _get(record, "length", int), _get(record, "neighbours", int), _get(record, "context", bytes),
                       tuple(scales))


@dataclass(frozen=True)
class Growth:
    """Where a growing model (ProGAN) is in its schedule when the round starts: the public image count that drives
    the schedule, and the stage it gives. Every hospital trains from this count, so all of them run the same stage
    and fade-in throughout the round."""

    images: int
    resolution: int
    alpha: float

    def to_record(self) -> dict[str, Any]:
        return {"growth.images": self.images, "growth.resolution": self.resolution, "growth.alpha": self.alpha}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "Growth | None":
        if "growth.images" not in record:
            return None
        return cls(_get(record, "growth.images", int), _get(record, "growth.resolution", int),
                   _get(record, "growth.alpha", float))


@dataclass(frozen=True)
class RoundInstruction:
    """What a hospital needs to know about the round it is asked to work in."""

    round: int
    resume_round: int  # the last round whose update the server aggregated from this hospital (0: none)
    round_public: bytes | None = None  # the aggregator's key for this round, when updates are encrypted
    secagg: SecAggTerms | None = None
    adverts: dict[int, KeyAdvert] | None = None  # share keys: every hospital's advertised keys
    signatures: dict[int, AdvertSignature] | None = None  # share keys: each advert's signature (absent: unsigned)
    inbox: dict[int, bytes] | None = None  # train under secure aggregation: the shares addressed to this hospital
    survivors: tuple[int, ...] | None = None  # unmask: whose masked input the server holds
    growth: Growth | None = None  # a growing model's schedule position: the stage every hospital trains

    def to_record(self) -> ConfigRecord:
        record: dict[str, Any] = {"round": self.round, "resume_round": self.resume_round}
        if self.growth is not None:
            record.update(self.growth.to_record())
        if self.round_public is not None:
            record["round_public"] = self.round_public
        if self.secagg is not None:
            record.update({f"secagg.{k}": v for k, v in self.secagg.to_record().items()})
        if self.adverts is not None:
            ids = sorted(self.adverts)
            record.update({"adverts.ids": ids, "adverts.cipher": [self.adverts[i].cipher_public for i in ids],
                           "adverts.mask": [self.adverts[i].mask_public for i in ids]})
            if self.signatures is not None:
                unsigned = AdvertSignature(b"", b"")
                record.update({"adverts.signer": [self.signatures.get(i, unsigned).signer for i in ids],
                               "adverts.signature": [self.signatures.get(i, unsigned).signature for i in ids]})
        if self.inbox is not None:
            ids = sorted(self.inbox)
            record.update({"inbox.from": ids, "inbox.ciphertext": [self.inbox[i] for i in ids]})
        if self.survivors is not None:
            record["survivors"] = list(self.survivors)
        return ConfigRecord(record)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "RoundInstruction":
        with _parsing("round instruction"):
            terms = {k.removeprefix("secagg."): v for k, v in record.items() if k.startswith("secagg.")}
            adverts = signatures = None
            if "adverts.ids" in record:
                ciphers = _pairs(record, "adverts.ids", "adverts.cipher", _blobs)
                masks = _pairs(record, "adverts.ids", "adverts.mask", _blobs)
                adverts = {i: KeyAdvert(ciphers[i], masks[i]) for i in ciphers}
                if "adverts.signer" in record:
                    signers = _pairs(record, "adverts.ids", "adverts.signer", _blobs)
                    sigs = _pairs(record, "adverts.ids", "adverts.signature", _blobs)
                    signatures = {i: AdvertSignature(signers[i], sigs[i]) for i in signers if sigs[i]}
            inbox = _pairs(record, "inbox.from", "inbox.ciphertext", _blobs) if "inbox.from" in record else None
            survivors = tuple(_ints(record, "survivors")) if "survivors" in record else None
            return cls(_get(record, "round", int), _get(record, "resume_round", int),
                       _optional(record, "round_public", bytes), SecAggTerms.from_record(terms) if terms else None,
                       adverts, signatures, inbox, survivors, Growth.from_record(record))

    def require(self, field_name: str) -> Any:
        """A field the stage at hand needs (secagg, adverts, inbox, survivors); MalformedMessage without it."""
        value = getattr(self, field_name)
        if value is None:
            raise MalformedMessage(f"round {self.round}: the instruction carries no {field_name}")
        return value


@dataclass(frozen=True)
class Instruction:
    """The content of a message from the aggregator."""

    job: Job
    round: RoundInstruction | None = None
    weights: dict[str, torch.Tensor] | None = None  # global shared networks (train) or generator (evaluate)

    def to_record(self) -> RecordDict:
        content = RecordDict({"job": self.job.to_record()})
        if self.round is not None:
            content["round"] = self.round.to_record()
        if self.weights is not None:
            content["weights"] = state_to_record(self.weights)
        return content

    @classmethod
    def from_record(cls, content: RecordDict) -> "Instruction":
        with _parsing("instruction"):
            round_ = RoundInstruction.from_record(content["round"]) if "round" in content else None
            weights = record_to_state(_get(content, "weights", ArrayRecord)) if "weights" in content else None
            return cls(Job.from_record(_get(content, "job", ConfigRecord)), round_, weights)

    def require_round(self) -> RoundInstruction:
        if self.round is None:
            raise MalformedMessage("the instruction names no round")
        return self.round

    def require_weights(self) -> dict[str, torch.Tensor]:
        if self.weights is None:
            raise MalformedMessage("the instruction carries no weights")
        return self.weights


# --- replies ---------------------------------------------------------------------------------------------------

def reply(to: Message, answer: "Hello | TrainReply | KeyAdvertReply | SharesReply | RevealsReply | EvaluationReply") -> Message:
    return Message(answer.to_record(), reply_to=to)


def _metrics(content: RecordDict, what: str, key: str = "metrics") -> dict[str, float]:
    record = _get(content, key, MetricRecord)
    return {k: float(_check(v, (int, float), f"{what} metric {k}")) for k, v in record.items()}


def _metric_record(metrics: Mapping[str, float | int]) -> MetricRecord:
    return MetricRecord({k: float(v) for k, v in metrics.items()})


@dataclass(frozen=True)
class Hello:
    hospital: int
    train_images: int
    train_patients: int
    holdout_images: int

    def to_record(self) -> RecordDict:
        return RecordDict({"hello": ConfigRecord(dataclasses.asdict(self))})

    @classmethod
    def from_record(cls, content: RecordDict) -> "Hello":
        with _parsing("hello"):
            record = _get(content, "hello", ConfigRecord)
            return cls(*(_get(record, f.name, int) for f in dataclasses.fields(cls)))


#: All that a hospital says in the clear beside its update: its privacy spend as its own ledger has it (ε of the
#: replace-one relation, Opacus' add/remove-one figure, δ, and 1 for a patient-level unit), and for a growing model
#: the stage it trained (resolution, fade-in α): the server's own schedule echoed, so that lockstep is checked.
PUBLIC_REPORT = ("epsilon", "epsilon_add_remove", "delta", "patient_level", "stage_resolution", "alpha")


@dataclass(frozen=True)
class TrainReply:
    """A hospital's update (opaque bytes when quantized, masked or sealed; else float tensors) and its public
    ``report`` (:data:`PUBLIC_REPORT` keys only). Training statistics travel inside the update's bytes
    (:func:`~medsyngan.federated.update_codec.attach_stats`), in ``stats`` only when the update itself travels
    as plain tensors, and not at all under DP or secure aggregation. Its FedAvg weight is the aggregator's, from
    the roster."""

    payload: bytes | dict[str, torch.Tensor]
    report: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] | None = None

    def to_record(self) -> RecordDict:
        update = (ConfigRecord({"payload": self.payload}) if isinstance(self.payload, bytes)
                  else state_to_record(self.payload))
        content = RecordDict({"update": update, "report": _metric_record(self.report)})
        if self.stats is not None:
            content["stats"] = _metric_record(self.stats)
        return content

    @classmethod
    def from_record(cls, content: RecordDict) -> "TrainReply":
        with _parsing("training reply"):
            update = _get(content, "update", (ConfigRecord, ArrayRecord))
            payload = (_get(update, "payload", bytes) if isinstance(update, ConfigRecord)
                       else record_to_state(update))
            report = _metrics(content, "training", "report")
            unknown = sorted(set(report) - set(PUBLIC_REPORT))
            if unknown:
                raise ValueError(f"its report holds {', '.join(unknown)} in the clear, which is no public field")
            if isinstance(payload, bytes) and "stats" in content:
                raise ValueError("it sends statistics in the clear beside an encoded update")
            stats = _metrics(content, "training", "stats") if "stats" in content else None
            return cls(payload, report, stats)


@dataclass(frozen=True)
class KeyAdvertReply:
    """A hospital's two public keys of the round, signed with its SuperNode key (:mod:`.advert_signing`)."""

    advert: KeyAdvert
    signature: AdvertSignature

    def to_record(self) -> RecordDict:
        return RecordDict({"secagg": ConfigRecord({"cipher_public": self.advert.cipher_public,
                                                   "mask_public": self.advert.mask_public,
                                                   "signer": self.signature.signer,
                                                   "signature": self.signature.signature})})

    @classmethod
    def from_record(cls, content: RecordDict) -> "KeyAdvertReply":
        with _parsing("key advert"):
            record = _get(content, "secagg", ConfigRecord)
            keys = [_get(record, name, bytes) for name in ("cipher_public", "mask_public")]
            if any(len(key) != PUBLIC_KEY_BYTES for key in keys):
                raise ValueError(f"an advertised key is not {PUBLIC_KEY_BYTES} bytes (X25519)")
            return cls(KeyAdvert(*keys), AdvertSignature(_get(record, "signer", bytes), _get(record, "signature", bytes)))


@dataclass(frozen=True)
class SharesReply:
    shares: dict[int, bytes]  # recipient → encrypted shares of this hospital's secrets

    def to_record(self) -> RecordDict:
        ids = sorted(self.shares)
        return RecordDict({"secagg": ConfigRecord({"to": ids, "ciphertext": [self.shares[i] for i in ids]})})

    @classmethod
    def from_record(cls, content: RecordDict) -> "SharesReply":
        with _parsing("key shares"):
            return cls(_pairs(_get(content, "secagg", ConfigRecord), "to", "ciphertext", _blobs))


@dataclass(frozen=True)
class RevealsReply:
    reveals: dict[int, tuple[str, int]]  # peer → ("b" self-mask share | "s" mask-key share, the share)

    def to_record(self) -> RecordDict:
        ids = sorted(self.reveals)
        return RecordDict({"secagg": ConfigRecord({
            "peer": ids, "kind": [self.reveals[i][0] for i in ids],
            "share": [self.reveals[i][1].to_bytes(SHARE_BYTES, "big") for i in ids]})})

    @classmethod
    def from_record(cls, content: RecordDict) -> "RevealsReply":
        with _parsing("unmasking shares"):
            record = _get(content, "secagg", ConfigRecord)
            kinds = _pairs(record, "peer", "kind", lambda r, k: [str(_check(v, str, k)) for v in _get(r, k, list)])
            shares = _pairs(record, "peer", "share", _blobs)
            if not set(kinds.values()) <= {"b", "s"}:
                raise ValueError("a share kind is neither 'b' (self-mask seed) nor 's' (mask key)")
            return cls({p: (kinds[p], int.from_bytes(shares[p], "big")) for p in kinds})


@dataclass(frozen=True)
class EvaluationReply:
    metrics: dict[str, float]  # scalar scores and ``holdout_images`` (0: the hospital has no held-out patients)

    @property
    def holdout_images(self) -> float:
        return self.metrics.get("holdout_images", 0.0)

    def to_record(self) -> RecordDict:
        return RecordDict({"metrics": _metric_record(self.metrics)})

    @classmethod
    def from_record(cls, content: RecordDict) -> "EvaluationReply":
        with _parsing("evaluation reply"):
            return cls(_metrics(content, "evaluation"))
