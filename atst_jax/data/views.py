"""On-device views, augmentations and masks (jax.numpy), keyed by a PRNG key derived from the step.

Doing this work inside the jitted step keeps the host pipeline to crop + batch, makes every random choice a
pure function of (seed, step) — so a resumed run repeats it exactly — and lets XLA fuse it.

- ``span_mask``: fairseq ``compute_mask_indices(mask_type="static", no_overlap=False)`` as the official ATST
  code calls it per example: ``int(ratio·N/span + U(0,1))`` spans (at least ``min_spans``), starts drawn
  without replacement from ``[0, N − span)``, spans may overlap (real masked fraction ≈ 0.50 at ratio 0.65).
- ``mixup``: BYOL-A log-mixup-exp, ``log((1−λ)·e^x + λ·e^z + eps)`` with λ ~ U(0, ratio). The partner z is
  either given (drawn from the mixup bank below, with rows left unmixed while the bank is empty) or another
  clip of the same batch (a random cyclic shift ≥ 1, so never the clip itself). z is the partner's whole
  padded crop and the mixed example keeps its own valid length, as the official transform mixes fixed-size
  crops (its short clips are zero-padded waveforms, whose floor-level frames enter the mix too).
- Mixup bank (``mixup_bank_*``): the official BYOL-A ``Mixup(ratio=0.4, n_memory=2000)`` draws z uniformly from
  a FIFO memory of the last 2,000 inputs it saw (before their own mixing), and leaves x unmixed while that
  memory is empty. Here the memory is method state: ``[B, S, F, T]`` for a global batch of B, S =
  ``⌈size / B⌉`` whole batches (at least ``size`` inputs), a ring filled one global batch per step. A loss
  call first draws its partners uniformly from the completed batches in it (every entry once it is full),
  then writes its own inputs. The batch axis is sharded like the global batch, so the bank costs 1/devices of
  its size per device and the writes stay on the devices that hold those rows; a draw costs one all-reduce
  of the drawn partners (``[b, F, T]``, as XLA partitions the gather from the sharded bank).
- ``freq_warp``: BYOL-A RandomResizeCrop as ATST-Frame configures it (virtual canvas 1×, time untouched): crop
  ``h = clip(int(U(lo, hi)·F), 1, F)`` mel bins at a random offset and resize back to F bins with PyTorch's
  bicubic (A = −0.75, ``align_corners=True``, border-clamped taps). Expressed as one ``[F, F]`` matrix per
  example, so the warp is a single batched matmul.
- ``gmml_corrupt`` (ASiT): per crop, random rectangles (``block_mask``, a ``lax.while_loop`` until the drawn
  share of pixels is covered) set to zero, or, with probability 0.5, filled from another clip's clean crop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

CUBIC_A = -0.75  # PyTorch's bicubic coefficient (jax.image uses the Keys kernel with A = -0.5)


# --- masks ----------------------------------------------------------------------------------------------
def max_spans(num_tokens: int, ratio: float, span: int, min_spans: int) -> int:
    """Upper bound of the number of spans ``int(ratio·N/span + u)``, u ∈ [0, 1)."""
    expected = ratio * num_tokens / span
    upper = int(expected) + (0 if float(expected).is_integer() else 1)
    return max(min_spans, min(upper, num_tokens - span))


def mask_capacity(num_tokens: int, ratio: float, span: int, min_spans: int) -> int:
    """The most tokens a span mask can cover: a static bound used to gather masked tokens."""
    return min(num_tokens, span * max_spans(num_tokens, ratio, span, min_spans))


def span_mask(key, batch: int, num_tokens: int, *, ratio=0.65, span=5, min_spans=2):
    """Boolean ``[batch, num_tokens]`` block mask (see module doc)."""
    k_count, k_start = jax.random.split(key)
    n_starts = num_tokens - span
    if n_starts < 1:
        raise ValueError(f"span masking needs more than span={span} tokens, got {num_tokens}")
    count = jnp.floor(ratio * num_tokens / span + jax.random.uniform(k_count, (batch,))).astype(jnp.int32)
    count = jnp.clip(count, min_spans, n_starts)
    # Sampling without replacement = the `count` smallest of i.i.d. uniform scores.
    scores = jax.random.uniform(k_start, (batch, n_starts))
    ranks = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
    starts = ranks < count[:, None]
    starts = jnp.pad(starts, ((0, 0), (0, span)))  # [batch, num_tokens]
    mask = jnp.zeros((batch, num_tokens), bool)
    for offset in range(span):
        mask = mask | jnp.roll(starts, offset, axis=1)  # starts < N - span: the roll never wraps a start
    return mask


def gather_masked(mask, capacity: int):
    """Indices ``[B, capacity]`` of the masked tokens (in order, padded with unmasked ones) and their validity.

    Masked tokens vary in number per example; a fixed capacity keeps shapes static so the heads run on
    ~capacity tokens instead of all N.
    """
    order = jnp.argsort(~mask, axis=1, stable=True)[:, :capacity]
    valid = jnp.take_along_axis(mask, order, axis=1)
    return order, valid


def take_tokens(x, idx):
    """``x [B, N, D]``, ``idx [B, K]`` → ``[B, K, D]``.

    Written as a one-hot batched matmul: exact (one 1.0 per row), and on XLA:CPU both it and its backward
    run on the GEMM path instead of a gather and a scatter-add.
    """
    onehot = jax.nn.one_hot(idx, x.shape[1], dtype=x.dtype)  # [B, K, N]
    return jnp.einsum("bkn,bnd->bkd", onehot, x, precision=jax.lax.Precision.HIGHEST)


# --- augmentations --------------------------------------------------------------------------------------
def mixup(key, x, ratio: float = 0.4, partner=None, use=None):
    """Log-mixup-exp of each example of ``x [B, F, T]`` with ``partner [B, F, T]`` (default: another example of
    the batch); ``use [B]`` (bool) leaves the rows where it is False unmixed (an empty mixup bank)."""
    b = x.shape[0]
    if ratio <= 0 or (partner is None and b < 2):
        return x
    k_lam, k_shift = jax.random.split(key)
    lam = ratio * jax.random.uniform(k_lam, (b, 1, 1), jnp.float32)
    if partner is None:
        z = jnp.roll(x, jax.random.randint(k_shift, (), 1, b), axis=0)
    else:
        z = partner
    x32, z32 = x.astype(jnp.float32), z.astype(jnp.float32)
    eps = jnp.finfo(jnp.float32).eps
    y = jnp.log((1 - lam) * jnp.exp(x32) + lam * jnp.exp(z32) + eps)
    if use is not None:
        y = jnp.where(use[:, None, None], y, x32)
    return y.astype(x.dtype)


# --- mixup bank (ATST-Frame, ATST-Clip) -----------------------------------------------------------------
def bank_slots(size: int, global_batch: int) -> int:
    """Whole global batches a mixup bank of ``size`` inputs keeps: ``⌈size / global_batch⌉``."""
    return -(-int(size) // int(global_batch))


def mixup_bank_init(size: int, global_batch: int, shapes) -> dict:
    """Method state of an empty mixup bank of at least ``size`` inputs, one ``[B, S, F, T]`` array per named
    input (``shapes``: ``{name: (F, T)}``; all written together), its batch axis sharded like the batch:
    ``mixup_bank`` (an ``nnx.State``, so checkpoints store plain arrays), ``mixup_pos`` (rows written, modulo
    the ring's ``S·B``) and ``mixup_filled`` (completed global batches, at most S)."""
    slots = bank_slots(size, global_batch)
    axes = ("batch", None, None, None)
    bank = {
        name: nnx.Variable(jnp.zeros((global_batch, slots, *shape), jnp.float32), axes=axes)
        for name, shape in shapes.items()
    }
    zero = jnp.zeros((), jnp.int32)
    return {"mixup_bank": nnx.State(bank), "mixup_pos": zero, "mixup_filled": zero}


def has_mixup_bank(state) -> bool:
    return isinstance(state, dict) and "mixup_bank" in state


def bank_partners(key, bank, filled, rows: int):
    """``rows`` partners ``[rows, F, T]`` drawn uniformly (with replacement) from the completed batches of
    ``bank [B, S, F, T]`` (slots ``0 … filled−1``; all S once full), and whether each row has one (bool
    ``[rows]``: False while the bank is empty)."""
    gb, slots = bank.shape[:2]
    n = jnp.maximum(filled, 1) * gb
    u = jax.random.randint(key, (rows,), 0, n)  # slot u // B, row u % B
    idx = (u % gb) * slots + u // gb  # the flat index of [B·S]: each device's rows stay contiguous
    z = jnp.take(bank.reshape(gb * slots, *bank.shape[2:]), idx, axis=0)
    return z, jnp.broadcast_to(filled > 0, (rows,))


def bank_write(bank, pos, filled, x):
    """Writes one loss call's inputs ``x [b, F, T]`` into ``bank [B, S, F, T]``; returns ``(bank, pos, filled)``.

    ``b = B / k`` with gradient accumulation over k microbatches: microbatch j holds global rows ``j, j+k, …``
    (train.py), and it is written to exactly those rows of the current slot, so after a step the slot holds
    the global batch in its own order, whatever k (a resumable setting), and every write stays on the devices
    that hold those rows. A slot counts as filled once its last microbatch is written."""
    gb, slots = bank.shape[:2]
    b = x.shape[0]
    if gb % b:
        raise ValueError(f"a mixup bank of global batch {gb} cannot take batches of {b} (not a divisor)")
    slot, col = pos // gb, (pos % gb) // b
    view = bank.reshape(b, gb // b, slots, *bank.shape[2:])
    zero = jnp.zeros((), jnp.int32)
    update = x.astype(bank.dtype)[:, None, None]
    view = jax.lax.dynamic_update_slice(view, update, (zero, col, slot, zero, zero))
    end = pos + b
    filled = jnp.where(end % gb == 0, jnp.minimum(filled + 1, slots), filled)
    return view.reshape(bank.shape), end % (gb * slots), filled


def mixup_bank_partners(key, state, sources, rows: int) -> list:
    """``[(partner, use)]``: independent draws of ``rows`` partners, one per entry of ``sources`` (the bank's
    input names; a name may repeat: ATST-Frame's two views mix from the one bank of their common crop)."""
    bank, filled = state["mixup_bank"], state["mixup_filled"]
    keys = jax.random.split(key, len(sources))
    return [bank_partners(k, bank[name][...], filled, rows) for name, k in zip(sources, keys, strict=True)]


def mixup_bank_update(state, inputs) -> dict:
    """``state`` with this call's pre-mixup ``inputs`` (``{name: [b, F, T]}``, one per bank) written."""
    pos, filled = state["mixup_pos"], state["mixup_filled"]
    banks = {}
    for name, var in state["mixup_bank"].items():
        value, new_pos, new_filled = bank_write(var[...], pos, filled, inputs[name])
        banks[name] = var.replace(value)
    return {**state, "mixup_bank": nnx.State(banks), "mixup_pos": new_pos, "mixup_filled": new_filled}


def _cubic_weights(t):
    """PyTorch's 4-tap bicubic convolution weights for fractional offset ``t`` ∈ [0, 1)."""
    a = CUBIC_A

    def near(s):  # |s| <= 1
        return ((a + 2) * s - (a + 3)) * s * s + 1

    def far(s):  # 1 < |s| < 2
        return ((a * s - 5 * a) * s + 8 * a) * s - 4 * a

    return jnp.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def freq_warp_matrix(height, offset, size: int, canvas: int | None = None):
    """``[B, size, canvas]`` matrices resizing rows ``offset … offset+height−1`` of a ``canvas``-row input
    (default ``size`` rows) to ``size`` rows (bicubic, align_corners=True, taps clamped to the crop)."""
    canvas = size if canvas is None else canvas
    height = height.astype(jnp.float32)
    i = jnp.arange(size, dtype=jnp.float32)
    scale = jnp.where(size > 1, (height - 1) / max(size - 1, 1), 0.0)  # [B]
    src = scale[:, None] * i[None, :]  # [B, size]
    base = jnp.floor(src)
    t = src - base
    w = _cubic_weights(t)  # [B, size, 4]
    taps = base[..., None] + jnp.arange(-1, 3, dtype=jnp.float32)  # [B, size, 4]
    taps = jnp.clip(taps, 0, height[:, None, None] - 1) + offset.astype(jnp.float32)[:, None, None]
    onehot = jax.nn.one_hot(taps.astype(jnp.int32), canvas, dtype=jnp.float32)  # [B, size, 4, canvas]
    return jnp.einsum("bik,bikj->bij", w, onehot)


def _crop_size_and_offset(key, batch: int, src: int, canvas: int, scale):
    """BYOL-A ``RandomResizeCrop.get_params`` along one axis: ``clip(int(U(lo, hi)·src), 1, canvas)`` and an
    offset drawn from ``[0, canvas − size]`` (both ends included; 0 when the crop fills the canvas)."""
    k_size, k_off = jax.random.split(key)
    size = jnp.floor(jax.random.uniform(k_size, (batch,), minval=scale[0], maxval=scale[1]) * src)
    size = jnp.clip(size, 1, canvas).astype(jnp.int32)
    room = (canvas - size + 1).astype(jnp.float32)
    offset = jnp.floor(jax.random.uniform(k_off, (batch,)) * room).astype(jnp.int32)
    return size, offset


def freq_warp(key, x, scale=(0.6, 1.5)):
    """Random frequency crop-and-resize of ``x [B, F, T]`` (time untouched)."""
    b, f, _ = x.shape
    h, offset = _crop_size_and_offset(key, b, f, f, scale)
    mat = freq_warp_matrix(h, offset, f)
    return jnp.einsum("bij,bjt->bit", mat, x.astype(jnp.float32)).astype(x.dtype)


def random_resize_crop(key, x, freq_scale=(0.6, 1.5), time_scale=(0.6, 1.5), virtual_time: float = 1.5):
    """BYOL-A RandomResizeCrop on both axes, as ATST-Clip configures it: ``x [B, F, T]`` is placed in the
    middle of a zero canvas of ``F × int(virtual_time·T)`` (virtual crop scale 1× frequency), a crop of
    ``clip(int(U(freq_scale)·F), 1, F)`` × ``clip(int(U(time_scale)·T), 1, canvas)`` at a random offset is
    resized back to ``F × T`` (PyTorch bicubic, ``align_corners=True``). Separable, so it is one ``[F, F]``
    and one ``[T, T]`` matrix per example: the canvas columns outside the input are zeros and drop out."""
    b, f, t = x.shape
    canvas_t = int(t * virtual_time)
    k_f, k_t = jax.random.split(key)
    h, i = _crop_size_and_offset(k_f, b, f, f, freq_scale)
    w, j = _crop_size_and_offset(k_t, b, t, canvas_t, time_scale)
    return resize_crop(x, h, i, w, j, canvas_t)


def resize_crop(x, h, i, w, j, canvas_t: int):
    """The deterministic part of ``random_resize_crop``: rows ``i … i+h−1`` and canvas columns ``j … j+w−1``
    (per example) of ``x [B, F, T]`` centred on a zero canvas of ``canvas_t`` columns, resized to ``F × T``."""
    _, f, t = x.shape
    rows = freq_warp_matrix(h, i, f)  # [B, F, F]
    start = (canvas_t - t) // 2  # where the input sits on the canvas
    cols = freq_warp_matrix(w, j, t, canvas_t)[:, :, start : start + t]  # [B, T(out), T(in)]
    y = jnp.einsum("bij,bjt->bit", rows, x.astype(jnp.float32))
    return jnp.einsum("bft,bst->bfs", y, cols).astype(x.dtype)


# --- GMML corruption (ASiT) -----------------------------------------------------------------------------
def block_mask(key, n_f: int, n_t: int, target, *, max_block: float = 0.3, max_blocks: int = 4096):
    """One example's GMML block mask, bool ``[n_f, n_t]`` (mel, time): random rectangles until at least
    ``target · n_f · n_t`` pixels are covered (the official ``GMML_drop_rand_patches`` with align 1).

    Each block: top-left corner ``(r, c)`` uniform in ``[0, side − 2]`` per axis, sides ``U{1, …, ⌊0.3·side⌋ −
    1}`` per axis, clipped at the edge; blocks may overlap. ``max_blocks`` only bounds the loop (the expected
    count for 70 % of a 592 × 128 crop is ≈ 60).
    """
    max_t, max_f = max(int(n_t * max_block), 2), max(int(n_f * max_block), 2)
    t_idx, f_idx = jnp.arange(n_t), jnp.arange(n_f)
    goal = target * (n_f * n_t)

    def cond(carry):
        i, _, covered = carry
        return (covered < goal) & (i < max_blocks)

    def body(carry):
        i, mask, _ = carry
        k_r, k_c, k_h, k_w = jax.random.split(jax.random.fold_in(key, i), 4)
        r = jax.random.randint(k_r, (), 0, max(n_t - 1, 1))
        c = jax.random.randint(k_c, (), 0, max(n_f - 1, 1))
        h = jnp.minimum(jax.random.randint(k_h, (), 1, max_t), n_t - r)
        w = jnp.minimum(jax.random.randint(k_w, (), 1, max_f), n_f - c)
        rows = (f_idx >= c) & (f_idx < c + w)
        cols = (t_idx >= r) & (t_idx < r + h)
        mask = mask | (rows[:, None] & cols[None, :])
        return i + 1, mask, jnp.sum(mask, dtype=jnp.int32)

    init = (jnp.zeros((), jnp.int32), jnp.zeros((n_f, n_t), bool), jnp.zeros((), jnp.int32))
    return jax.lax.while_loop(cond, body, init)[1]


def gmml_corrupt(
    key,
    x,
    *,
    area=(0.5, 0.7),
    paste_prob: float = 0.5,
    paste_area=(0.3, 0.3),
    max_block: float = 0.3,
    fill: float = 0.0,
    pool: int | None = None,
):
    """ASiT's group-masked corruption of clean crops ``x [B, F, T]`` (model-normalised values).

    Per example: with probability ``1 − paste_prob`` a block mask covering a fraction ``U(area)`` of the pixels
    is set to ``fill`` (0, the official ``drop_type='zeros'``); otherwise that is discarded and a block mask
    covering ``U(paste_area)`` (official: ``U(min(0.5, 0.3), 0.3)`` = 0.3) is filled with the same pixels of
    the clean crop of a random example of its pool (possibly itself, as the official collate draws it).
    ``pool``: the rows are cut into consecutive pools of this many (the last may be shorter) and a partner
    comes from the row's own pool — the official collate pastes within one data loader's batch, for each
    crop separately; ``None``: the whole batch is one pool.
    Returns the corrupted crops and the bool mask of the replaced pixels, ``[B, F, T]`` each.
    """
    b, n_f, n_t = x.shape
    k_area, k_paste_area, k_paste, k_partner, k_blocks = jax.random.split(key, 5)
    drop = jax.random.uniform(k_area, (b,), jnp.float32, area[0], area[1])
    paste = jax.random.uniform(k_paste_area, (b,), jnp.float32, paste_area[0], paste_area[1])
    use_paste = jax.random.bernoulli(k_paste, paste_prob, (b,))
    target = jnp.where(use_paste, paste, drop)
    keys = jax.random.split(k_blocks, b)
    mask = jax.vmap(lambda k, a: block_mask(k, n_f, n_t, a, max_block=max_block))(keys, target)
    if pool is None or pool >= b:
        partner = jax.random.randint(k_partner, (b,), 0, b)
    else:
        start = (jnp.arange(b) // max(int(pool), 1)) * max(int(pool), 1)
        size = jnp.minimum(max(int(pool), 1), b - start)
        partner = start + jax.random.randint(k_partner, (b,), 0, size)
    source = jnp.where(use_paste[:, None, None], x[partner], jnp.asarray(fill, x.dtype))
    return jnp.where(mask, source, x), mask


# --- inverse block masks (data2vec 2.0 / EAT multi-mask; AaSP) ------------------------------------------
def visible_count(num_tokens: int, mask_ratio: float) -> int:
    """Tokens a copy keeps when ``mask_ratio`` of ``num_tokens`` are masked: ``round(N·(1 − r))``, at least 1
    and at most ``N − 1`` (a static count: every copy has the same sequence length)."""
    return min(max(1, int(round(num_tokens * (1.0 - mask_ratio)))), num_tokens - 1)


def inverse_block_mask(key, batch: int, grid: tuple[int, int], visible: int, *, block=(5, 5), valid=None):
    """``batch`` masks over a time-major ``grid = (n_t, n_f)`` token grid that keep **exactly** ``visible``
    tokens, grown as blocks of visible tokens (the masked set is their complement: "inverse" block masking).

    Per mask: ``2·⌈visible / (b_t·b_f)⌉ + 1`` blocks of ``block`` (clipped to the grid) at uniform random
    corners, in a random priority order; the visible tokens are the ``visible`` best by (priority of the
    first block covering them, then a random tie-break), so whole blocks are kept first, the last one in
    part, and uncovered tokens only fill up what overlapping blocks left short. ``valid [batch, N]`` (bool)
    marks real tokens: padding is picked last (never while enough real tokens remain).

    Returns ``(visible_idx [batch, visible], masked_idx [batch, N − visible])`` int32, each sorted ascending
    — static shapes: the student encodes ``visible`` tokens per copy and the predictor answers ``N − visible``.
    """
    n_t, n_f = grid
    n = n_t * n_f
    if not 0 < visible < n:
        raise ValueError(f"inverse block masking needs 0 < visible < {n} tokens, got {visible}")
    b_t, b_f = min(int(block[0]), n_t), min(int(block[1]), n_f)
    n_blocks = 2 * -(-visible // (b_t * b_f)) + 1
    k_t, k_f, k_tie = jax.random.split(key, 3)
    t0 = jax.random.randint(k_t, (batch, n_blocks, 1), 0, n_t - b_t + 1)
    f0 = jax.random.randint(k_f, (batch, n_blocks, 1), 0, n_f - b_f + 1)
    tok_t, tok_f = jnp.arange(n)[None, None, :] // n_f, jnp.arange(n)[None, None, :] % n_f
    covered = (tok_t >= t0) & (tok_t < t0 + b_t) & (tok_f >= f0) & (tok_f < f0 + b_f)  # [batch, blocks, N]
    priority = (n_blocks - jnp.arange(n_blocks, dtype=jnp.float32))[None, :, None]  # block 0 first
    level = jnp.max(jnp.where(covered, priority, 0.0), axis=1)  # [batch, N]: 0 = uncovered
    tie = 0.5 * jax.random.uniform(k_tie, (batch, n))  # distinct (a.s.): the two top_k are complements
    score = level + tie
    if valid is not None:
        score = jnp.where(valid, score, tie - 1.0)
    vis = jax.lax.top_k(score, visible)[1]
    hid = jax.lax.top_k(-score, n - visible)[1]
    return jnp.sort(vis, axis=1).astype(jnp.int32), jnp.sort(hid, axis=1).astype(jnp.int32)


def eat_visible_count(num_tokens: int, mask_ratio: float) -> int:
    """EAT's visible count: ``int(N·(1 − r))`` in floating point (data2vec 2.0 / EAT ``compute_block_mask_2d``
    with ``inverse_mask``: 102 of 512 tokens at r = 0.8), at least 1 and at most ``N − 1``."""
    return min(max(1, int(num_tokens * (1.0 - mask_ratio))), num_tokens - 1)


def eat_block_centres(num_tokens: int, mask_ratio: float, block=(5, 5), adjust: float = 0.07) -> int:
    """How many block centres EAT draws per copy: ``int(N·(1 − r + adjust) / (b_t·b_f))`` (``mask_prob_adjust``;
    5 for 512 tokens, r = 0.8, adjust 0.07, 5 × 5 blocks)."""
    return max(int(num_tokens * (((1.0 - mask_ratio) + adjust) / (int(block[0]) * int(block[1])))), 0)


def eat_inverse_block_mask(
    key,
    batch: int,
    grid: tuple[int, int],
    mask_ratio: float,
    *,
    block=(5, 5),
    adjust: float = 0.07,
    valid=None,
):
    """EAT's inverse block mask (data2vec 2.0 ``compute_block_mask_2d`` with ``inverse_mask=True``,
    ``require_same_masks=True``, ``mask_dropout=0``) over a time-major ``grid = (n_t, n_f)``, as static shapes.

    Per copy: ``eat_block_centres`` centres drawn uniformly **with replacement** over the tokens; each makes a
    ``block`` of visible tokens spanning ``[c − b//2, c − b//2 + b − 1]`` on each axis, cut at the grid's edges
    (so blocks near an edge are smaller); the union is then brought to exactly ``eat_visible_count`` tokens
    by dropping a uniformly random subset of it (too many) or adding a uniformly random subset of the other
    tokens (too few). Here both are one ``top_k`` over (in the union, then a uniform random tie-break), which
    keeps a uniformly random subset of the union or adds a uniformly random subset of the rest, as EAT's
    draws without replacement do.

    Ours (EAT has no padding): ``valid [batch, N]`` (bool, real tokens a prefix, as ``FrameAST.valid_mask``
    makes them) draws the centres among a copy's real tokens and picks padding last (never while enough real
    tokens remain). Returns ``(visible_idx [batch, V], masked_idx [batch, N − V])`` int32, each sorted.
    """
    n_t, n_f = grid
    n = n_t * n_f
    visible = eat_visible_count(n, mask_ratio)
    if not 0 < visible < n:
        raise ValueError(f"inverse block masking needs 0 < visible < {n} tokens, got {visible}")
    b_t, b_f = int(block[0]), int(block[1])
    n_c = eat_block_centres(n, mask_ratio, block, adjust)
    k_c, k_tie = jax.random.split(key)
    tok = jnp.arange(n)
    if n_c > 0:
        u = jax.random.uniform(k_c, (batch, n_c))
        n_real = jnp.full((batch,), n) if valid is None else jnp.maximum(jnp.sum(valid, axis=1), 1)
        centre = jnp.minimum((u * n_real[:, None]).astype(jnp.int32), n_real[:, None] - 1)[..., None]
        lo_t, lo_f = centre // n_f - b_t // 2, centre % n_f - b_f // 2  # [batch, n_c, 1]
        t, f = (tok // n_f)[None, None, :], (tok % n_f)[None, None, :]
        cover = (t >= lo_t) & (t < lo_t + b_t) & (f >= lo_f) & (f < lo_f + b_f)  # [batch, n_c, N]
        union = jnp.any(cover, axis=1)
    else:
        union = jnp.zeros((batch, n), bool)
    tie = 0.5 * jax.random.uniform(k_tie, (batch, n))  # distinct (a.s.): the two top_k are complements
    score = union.astype(jnp.float32) + tie
    if valid is not None:
        score = jnp.where(valid, score, tie - 1.0)
    vis = jax.lax.top_k(score, visible)[1]
    hid = jax.lax.top_k(-score, n - visible)[1]
    return jnp.sort(vis, axis=1).astype(jnp.int32), jnp.sort(hid, axis=1).astype(jnp.int32)
