import hashlib
import json
import struct
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.security import envelope
from common.security.envelope import (
    PROTOCOL_VERSION,
    BadSignature,
    DecryptionFailed,
    EnvelopeContext,
    EnvelopeError,
    MalformedEnvelope,
    PayloadTooLarge,
    ReplayedEnvelope,
    UnknownSigner,
    WrongBaseModel,
    WrongKind,
    WrongRecipient,
    envelope_overhead,
    open_envelope,
    seal,
    sign_instruction,
    verify_instruction,
)
from common.security.keys import Identity, PublicIdentity
from common.security.tensors import TensorFormatError, tensors_from_bytes, tensors_to_bytes

BASE_MODEL = hashlib.sha256(b"pretrained checkpoint").hexdigest()
OTHER_MODEL = hashlib.sha256(b"another checkpoint").hexdigest()
COORDINATOR = Identity.generate("coordinator")
OTHER_COORDINATOR = Identity.generate("coordinator")
CLEVELAND = Identity.generate("cleveland")
HUNGARY = Identity.generate("hungary")
ROGUE = Identity.generate("rogue")
MANIFEST_SITES: dict[str, PublicIdentity] = {site.name: site.public() for site in (CLEVELAND, HUNGARY)}
PAYLOAD = b"adapter weights \x00\x01\x02 and a privacy report"
PREFIX = struct.Struct(">4sBBH")


def ctx(
    site: str = "cleveland", run_id: str = "7", rnd: int = 3, kind: str = "train-reply", base_model: str = BASE_MODEL
) -> EnvelopeContext:
    return EnvelopeContext(run_id, rnd, site, kind, base_model)


def sealed(
    payload: bytes = PAYLOAD,
    context: EnvelopeContext | None = None,
    sender: Identity = CLEVELAND,
    recipient: Identity = COORDINATOR,
) -> bytes:
    return seal(payload, context or ctx(sender.name), sender, recipient.public())


def open_(blob: bytes, expected: EnvelopeContext | None = None, **kwargs) -> bytes:
    return open_envelope(blob, expected or ctx(), COORDINATOR, MANIFEST_SITES, **kwargs)


SEALED = sealed()


def reframe(blob: bytes, change_header, signer: Identity | None = None) -> bytes:
    """Rewrite a blob's header as an attacker would, optionally re-signing it."""
    magic, version, kind, header_len = PREFIX.unpack_from(blob)
    header = json.loads(blob[PREFIX.size : PREFIX.size + header_len])
    change_header(header)
    new_header = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    rest = blob[PREFIX.size + header_len : -64]
    unsigned = PREFIX.pack(magic, version, kind, len(new_header)) + new_header + rest
    if signer is None:
        return unsigned + blob[-64:]
    return unsigned + signer.signing_key.sign(envelope._SIGN_DOMAIN[kind] + unsigned)


# --- round trips -----------------------------------------------------------------


def test_seal_open_round_trip() -> None:
    assert open_(SEALED) == PAYLOAD


def test_ciphertext_hides_payload_and_is_fresh_each_time() -> None:
    assert PAYLOAD not in SEALED
    assert sealed() != sealed()


def test_empty_payload_round_trip() -> None:
    assert open_(sealed(b"")) == b""


def test_seal_refuses_to_label_an_update_as_another_site() -> None:
    with pytest.raises(ValueError, match="cannot seal an update labelled as site 'hungary'"):
        seal(PAYLOAD, ctx("hungary"), CLEVELAND, COORDINATOR.public())


def test_context_validation() -> None:
    for bad in (-1, 7, "", "7A", "g", "0" * 65, "7\n"):
        with pytest.raises(ValueError, match="run_id"):
            ctx(run_id=bad)
    with pytest.raises(ValueError, match="server_round"):
        ctx(rnd=True)
    with pytest.raises(ValueError, match="kind"):
        ctx(kind="Train Reply")
    with pytest.raises(ValueError, match="base_model"):
        ctx(base_model="ABC")
    with pytest.raises(ValueError, match="invalid participant name"):
        ctx(site="../x")


def test_overhead_is_exact_for_a_context_and_bounded_without() -> None:
    for payload in (b"", b"x", bytes(10_000)):
        added = len(sealed(payload)) - len(payload)
        assert added == envelope_overhead(len(payload), ctx())
        assert added <= envelope_overhead(len(payload))
    with pytest.raises(ValueError):
        envelope_overhead(-1)


# --- tampering -------------------------------------------------------------------


def test_every_single_bit_flip_is_rejected() -> None:
    body_start = len(SEALED) - 64 - (len(PAYLOAD) + 16)
    for index in range(len(SEALED)):
        for bit in range(8):
            mutated = bytearray(SEALED)
            mutated[index] ^= 1 << bit
            with pytest.raises(EnvelopeError) as info:
                open_(bytes(mutated))
            if index >= body_start:
                assert isinstance(info.value, BadSignature), (index, bit)
                assert "signature does not match" in str(info.value)


def test_truncated_envelope() -> None:
    with pytest.raises(MalformedEnvelope, match="truncated") as info:
        open_(SEALED[:-1])
    assert "'cleveland'" in str(info.value)
    for length in range(len(SEALED)):
        with pytest.raises(MalformedEnvelope, match="truncated"):
            open_(SEALED[:length])


def test_trailing_bytes_are_rejected() -> None:
    with pytest.raises(MalformedEnvelope, match="trailing bytes"):
        open_(SEALED + b"\x00")


def test_not_an_envelope() -> None:
    with pytest.raises(MalformedEnvelope, match="bad magic"):
        open_(b"PK\x03\x04" + bytes(200))


def test_unsupported_version() -> None:
    blob = bytearray(SEALED)
    blob[4] = PROTOCOL_VERSION + 1
    with pytest.raises(MalformedEnvelope, match="version 2 is not supported"):
        open_(bytes(blob))


def test_oversized_header_is_rejected_before_reading_it() -> None:
    blob = PREFIX.pack(b"FTEV", PROTOCOL_VERSION, 1, 65535) + bytes(70_000)
    with pytest.raises(MalformedEnvelope, match="exceeds the 4096-byte limit"):
        open_(blob)


def test_non_canonical_header_is_rejected() -> None:
    magic, version, kind, header_len = PREFIX.unpack_from(SEALED)
    header = json.loads(SEALED[PREFIX.size : PREFIX.size + header_len])
    spaced = json.dumps(header, sort_keys=True).encode()
    rest = SEALED[PREFIX.size + header_len :]
    blob = PREFIX.pack(magic, version, kind, len(spaced)) + spaced + rest
    with pytest.raises(MalformedEnvelope, match="canonical"):
        open_(blob)


def test_oversized_payload() -> None:
    big = sealed(bytes(4096))
    with pytest.raises(PayloadTooLarge, match="above the limit of 1024") as info:
        open_(big, max_bytes=1024)
    assert "'cleveland'" in str(info.value)
    assert open_(big, max_bytes=len(big)) == bytes(4096)


# --- replay, identity and routing ----------------------------------------------------


def test_update_replayed_from_an_earlier_round() -> None:
    old = sealed(context=ctx(rnd=2))
    with pytest.raises(ReplayedEnvelope, match="round 2, not the current round 3") as info:
        open_(old, ctx(rnd=3))
    assert "'cleveland'" in str(info.value)


def test_update_replayed_from_another_run() -> None:
    other_run = sealed(context=ctx(run_id="6"))
    with pytest.raises(ReplayedEnvelope, match="run 6, not the current run 7"):
        open_(other_run)


def test_update_from_a_site_not_in_the_manifest() -> None:
    rogue = sealed(sender=ROGUE)
    with pytest.raises(UnknownSigner, match="'rogue', which is not in the federation manifest"):
        open_(rogue, ctx("rogue"))


def test_update_signed_by_a_key_not_in_the_manifest_claiming_a_known_site() -> None:
    impostor = Identity.generate("cleveland")
    with pytest.raises(BadSignature, match="signature does not match the site's key"):
        open_(sealed(sender=impostor))


def test_envelope_relabelled_as_another_sites_reply() -> None:
    with pytest.raises(UnknownSigner, match="signed as site 'cleveland'") as info:
        open_(SEALED, ctx("hungary"))
    assert "'hungary'" in str(info.value)


def test_header_rewritten_to_another_site_breaks_the_signature() -> None:
    relabelled = reframe(SEALED, lambda h: h.__setitem__("site_id", "hungary"))
    with pytest.raises(BadSignature):
        open_(relabelled, ctx("hungary"))


def test_site_re_signing_another_sites_update_as_its_own_cannot_decrypt() -> None:
    stolen = reframe(SEALED, lambda h: h.__setitem__("site_id", "hungary"), signer=HUNGARY)
    with pytest.raises(DecryptionFailed, match="does not decrypt") as info:
        open_(stolen, ctx("hungary"))
    assert "'hungary'" in str(info.value)


def test_update_sealed_to_the_wrong_coordinator_key() -> None:
    misaddressed = sealed(recipient=OTHER_COORDINATOR)
    with pytest.raises(WrongRecipient, match="outdated or wrong manifest"):
        open_(misaddressed)


def test_recipient_fingerprint_rewritten_still_fails_to_decrypt() -> None:
    mine = COORDINATOR.public().fingerprint()
    misaddressed = sealed(recipient=OTHER_COORDINATOR)
    forged = reframe(misaddressed, lambda h: h.__setitem__("recipient", mine), signer=CLEVELAND)
    with pytest.raises(DecryptionFailed):
        open_(forged)


def test_wrong_kind() -> None:
    with pytest.raises(WrongKind, match="'train-reply' message, expected 'evaluate-reply'"):
        open_(SEALED, ctx(kind="evaluate-reply"))


def test_base_model_mismatch() -> None:
    with pytest.raises(WrongBaseModel, match="different pretrained checkpoints"):
        open_(SEALED, ctx(base_model=OTHER_MODEL))


def test_instruction_is_not_accepted_as_an_update() -> None:
    instruction = sign_instruction(PAYLOAD, ctx(), COORDINATOR)
    with pytest.raises(MalformedEnvelope, match="signed instruction where a sealed update"):
        open_(instruction)


# --- downlink instructions ---------------------------------------------------------

EPSILON_1 = json.dumps({"epsilon": 1.0, "epochs": 2}).encode()
EPSILON_50 = json.dumps({"epsilon": 9.0, "epochs": 2}).encode()


def ictx(site: str = "*", rnd: int = 3, **kwargs) -> EnvelopeContext:
    return ctx(site=site, rnd=rnd, kind=kwargs.pop("kind", "train"), **kwargs)


def verify(blob: bytes, expected: EnvelopeContext | None = None, **kwargs) -> bytes:
    return verify_instruction(blob, expected or ictx("cleveland"), COORDINATOR.public(), **kwargs)


BROADCAST = sign_instruction(EPSILON_1, ictx(), COORDINATOR)


def test_instruction_round_trip_for_every_site() -> None:
    assert verify(BROADCAST, ictx("cleveland")) == EPSILON_1
    assert verify(BROADCAST, ictx("hungary")) == EPSILON_1
    assert verify(BROADCAST, ictx("*")) == EPSILON_1


def test_instruction_round_rule_accepts_equal_or_newer_rejects_older() -> None:
    assert verify(BROADCAST, ictx("cleveland", rnd=3)) == EPSILON_1
    assert verify(BROADCAST, ictx("cleveland", rnd=1)) == EPSILON_1
    with pytest.raises(ReplayedEnvelope, match="round 3, older than round 4") as info:
        verify(BROADCAST, ictx("cleveland", rnd=4))
    assert "instruction for site 'cleveland'" in str(info.value)


def test_instruction_from_another_run() -> None:
    with pytest.raises(ReplayedEnvelope, match="run 7, not the current run 8"):
        verify(BROADCAST, ictx("cleveland", run_id="8"))


def test_instruction_addressed_to_one_site() -> None:
    addressed = sign_instruction(EPSILON_1, ictx("hungary"), COORDINATOR)
    assert verify(addressed, ictx("hungary")) == EPSILON_1
    with pytest.raises(WrongRecipient, match="addressed to site 'hungary'"):
        verify(addressed, ictx("cleveland"))


def test_instruction_with_a_forged_signature() -> None:
    forged = BROADCAST[:-64] + bytes(64)
    with pytest.raises(BadSignature, match="altered or forged"):
        verify(forged)


def test_instruction_payload_changed_in_transit() -> None:
    assert len(EPSILON_1) == len(EPSILON_50)
    tampered = BROADCAST.replace(EPSILON_1, EPSILON_50)
    with pytest.raises(BadSignature, match="altered or forged"):
        verify(tampered)


def test_instruction_asking_for_more_epsilon_signed_by_a_non_coordinator_key() -> None:
    forged = sign_instruction(EPSILON_50, ictx(), HUNGARY)
    with pytest.raises(BadSignature, match="not by the coordinator"):
        verify(forged)


def test_impostor_coordinator_claiming_the_real_fingerprint() -> None:
    real = COORDINATOR.public().fingerprint()
    forged = reframe(
        sign_instruction(EPSILON_50, ictx(), OTHER_COORDINATOR),
        lambda h: h.__setitem__("signer", real),
        signer=OTHER_COORDINATOR,
    )
    with pytest.raises(BadSignature, match="does not verify with coordinator"):
        verify(forged)


def test_instruction_wrong_kind_and_base_model() -> None:
    with pytest.raises(WrongKind, match="expected 'evaluate'"):
        verify(BROADCAST, ictx("cleveland", kind="evaluate"))
    with pytest.raises(WrongBaseModel):
        verify(BROADCAST, ictx("cleveland", base_model=OTHER_MODEL))


def test_instruction_size_limit_and_type_confusion() -> None:
    with pytest.raises(PayloadTooLarge):
        verify(BROADCAST, max_bytes=100)
    with pytest.raises(MalformedEnvelope, match="sealed update where a signed instruction"):
        verify(SEALED)
    with pytest.raises(MalformedEnvelope, match="truncated"):
        verify(BROADCAST[:-10])


# --- properties --------------------------------------------------------------------

_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
]


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(_DTYPES))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    count = 1
    for dim in shape:
        count *= dim
    if dtype.is_floating_point:
        values = st.floats(width=32, allow_nan=True, allow_infinity=True)
    elif dtype == torch.bool:
        values = st.booleans()
    else:
        info = torch.iinfo(dtype)
        values = st.integers(info.min, info.max)
    data = draw(st.lists(values, min_size=count, max_size=count))
    return torch.tensor(data, dtype=dtype).reshape(shape)


tensor_dicts = st.dictionaries(
    st.text(min_size=1, max_size=24).filter(lambda name: name != "__metadata__"),
    tensors(),
    max_size=4,
)
contexts = st.builds(
    EnvelopeContext,
    run_id=st.from_regex(r"[0-9a-f]{1,64}", fullmatch=True),
    server_round=st.integers(0, 2**32 - 1),
    site_id=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True),
    kind=st.from_regex(r"[a-z][a-z0-9-]{0,31}", fullmatch=True),
    base_model=st.binary(min_size=32, max_size=32).map(bytes.hex),
)


@settings(max_examples=60, deadline=None)
@given(update=tensor_dicts, context=contexts)
def test_property_seal_open_round_trips_tensors(update: dict, context: EnvelopeContext) -> None:
    sender = Identity.generate(context.site_id)
    blob = seal(tensors_to_bytes(update), context, sender, COORDINATOR.public())
    assert len(blob) - len(tensors_to_bytes(update)) == envelope_overhead(0, context)
    opened = tensors_from_bytes(open_envelope(blob, context, COORDINATOR, {context.site_id: sender.public()}))
    assert opened.keys() == update.keys()
    for name, tensor in update.items():
        assert opened[name].dtype == tensor.dtype
        torch.testing.assert_close(opened[name], tensor, rtol=0, atol=0, equal_nan=True)


@settings(max_examples=60, deadline=None)
@given(payload=st.binary(max_size=2048), context=contexts)
def test_property_instruction_round_trips(payload: bytes, context: EnvelopeContext) -> None:
    addressed = sign_instruction(payload, context, COORDINATOR)
    assert verify_instruction(addressed, context, COORDINATOR.public()) == payload
    broadcast = sign_instruction(payload, replace(context, site_id="*"), COORDINATOR)
    assert verify_instruction(broadcast, context, COORDINATOR.public()) == payload


_positions = st.integers(0, 2**16)
_mutations = st.one_of(
    st.tuples(st.just("flip"), _positions, st.integers(0, 7)),
    st.tuples(st.just("truncate"), _positions, st.just(0)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=64), st.just(0)),
    st.tuples(st.just("overwrite"), _positions, st.integers(1, 255)),
)


def _mutate(blob: bytes, mutation: tuple) -> bytes:
    """Apply one mutation; positions wrap around the current length."""
    action, where, what = mutation
    if action == "extend":
        return blob + where
    if not blob:
        return blob
    where %= len(blob)
    if action == "truncate":
        return blob[:where]
    mask = 1 << what if action == "flip" else what
    return blob[:where] + bytes([blob[where] ^ mask]) + blob[where + 1 :]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(_mutations, min_size=1, max_size=3))
def test_property_mutated_envelopes_never_open(mutations: list) -> None:
    blob = SEALED
    for mutation in mutations:
        blob = _mutate(blob, mutation)
    if blob == SEALED:
        return
    with pytest.raises(EnvelopeError):
        open_(blob)


@settings(max_examples=100, deadline=None)
@given(mutation=_mutations)
def test_property_mutated_instructions_never_verify(mutation: tuple) -> None:
    blob = _mutate(BROADCAST, mutation)
    if blob == BROADCAST:
        return
    with pytest.raises(EnvelopeError):
        verify(blob)


@settings(max_examples=60, deadline=None)
@given(junk=st.binary(max_size=512))
def test_property_malformed_tensor_bytes_raise_a_specific_error(junk: bytes) -> None:
    try:
        tensors_from_bytes(junk)
    except TensorFormatError as exc:
        assert "not a valid safetensors payload" in str(exc)


def test_tensors_serialise_views_and_graph_tensors() -> None:
    weight = torch.arange(12.0, requires_grad=True).reshape(3, 4)
    data = tensors_to_bytes({"w.t": weight.t(), "w": weight})
    loaded = tensors_from_bytes(data)
    assert torch.equal(loaded["w.t"], weight.detach().t())
    assert torch.equal(loaded["w"], weight.detach())
    with pytest.raises(TypeError, match="not a torch.Tensor"):
        tensors_to_bytes({"x": [1.0]})


@settings(max_examples=50, deadline=None)
@given(update=tensor_dicts.filter(bool), cut=st.integers(1, 2**16))
def test_property_truncated_tensor_bytes_raise_tensor_format_error(update: dict, cut: int) -> None:
    data = tensors_to_bytes(update)
    with pytest.raises(TensorFormatError, match="not a valid safetensors payload"):
        tensors_from_bytes(data[: len(data) - 1 - cut % len(data)])
