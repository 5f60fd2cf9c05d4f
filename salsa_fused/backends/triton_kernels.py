"""Fused multi-tensor Triton kernels of SaLSa (private; launched by ``triton_backend``).

One launch covers a whole bucket through two tables built once on the host:

    tensor_table  int64 [n_tensors, TABLE_WIDTH]
                  row i = (numel_i, &w_i, &g_i, &m_i, &v_i, &saved_i or 0)
    block_table   int32 [n_blocks, 2]
                  row b = (i, j): program b covers elements [j*BLOCK, min((j+1)*BLOCK, numel_i))
                  of tensor i

so the grid is the total number of blocks over all tensors. A block that lies wholly
inside its tensor takes an unmasked branch; only the last block of a tensor is masked.
With ``ALIGNED`` every stream of every tensor in the table starts on a 16-byte boundary
(checked on the host), which the kernel states with ``tl.multiple_of`` so that the
unmasked branch compiles to 128-bit loads and stores; tensors that are not aligned (a
view at an odd offset) go to a second table launched with ``ALIGNED=False``.

Math (SPEC section 1; ``base.py``), per element, in fp32, each result rounded once
to the stream's dtype when stored:

    g       = grad / grad_scale                              (with a GradScaler)
    v_new   = v * beta2 + (g * g) * (1 - beta2)
    m_new   = m * beta1 + g * (1 - beta1)
    precond = 1 / (sqrt(v_new / bc2) + eps)                  bc2 = 1 - beta2^(k+1)
    m_hat   = m_new / bc1                                    bc1 = 1 - beta1^(k+1)
                                       (Adam's k in both under the "sls" and "alsals" rules: rules.moment_step)
    d       = precond * g   |   precond * m_hat   |   g      (direction gradient | momentum | raw)

A ``DIRECTION`` constexpr picks the direction (``GRADIENT_DIRECTION``, ``MOMENTUM_DIRECTION``,
``RAW_DIRECTION``); the plain step takes ``MOMENTUM_DIRECTION`` (Adam's update) or
``RAW_DIRECTION``. Along ``raw`` no kernel reads or writes m, v.

Divisions and square roots are IEEE round-to-nearest (``div_rn``, ``sqrt_rn``), and the
backend launches with fp fusion off: ``tl.fma`` appears exactly where the torch reference
makes one rounding (``w.add(d, alpha=-step)``), so a GPU run follows the reference's
operation forms.
"""

import triton
import triton.language as tl

# Column of each stream in a tensor_table row.
NUMEL_COLUMN = 0
PARAM_COLUMN = 1
GRAD_COLUMN = 2
EXP_AVG_COLUMN = 3
EXP_AVG_SQ_COLUMN = 4
SAVED_COLUMN = 5
TABLE_WIDTH = 6

_TABLE_WIDTH = tl.constexpr(TABLE_WIDTH)
_PARAM = tl.constexpr(PARAM_COLUMN)
_GRAD = tl.constexpr(GRAD_COLUMN)
_EXP_AVG = tl.constexpr(EXP_AVG_COLUMN)
_EXP_AVG_SQ = tl.constexpr(EXP_AVG_SQ_COLUMN)
_SAVED = tl.constexpr(SAVED_COLUMN)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)  # |x| <= FLT_MAX  <=>  x finite
# The smallest fp32 magnitudes that round (to nearest even) to inf in bf16 and in float16.
_BF16_OVERFLOW = tl.constexpr(3.39617752923046e38)  # 0x7F7F8000
_FP16_OVERFLOW = tl.constexpr(65520.0)

# Values of the DIRECTION constexpr.
GRADIENT_DIRECTION = 0
MOMENTUM_DIRECTION = 1
RAW_DIRECTION = 2
_GRADIENT = tl.constexpr(GRADIENT_DIRECTION)
_MOMENTUM = tl.constexpr(MOMENTUM_DIRECTION)
_RAW = tl.constexpr(RAW_DIRECTION)


# --- addressing ------------------------------------------------------------------


@triton.jit
def _locate_block(tensor_table_ptr, block_table_ptr, BLOCK: tl.constexpr):
    """(row pointer of this program's tensor, its numel, int64 offsets [BLOCK], block is full)."""
    pid = tl.program_id(0).to(tl.int64)
    tensor_index = tl.load(block_table_ptr + 2 * pid).to(tl.int64)
    block_index = tl.load(block_table_ptr + 2 * pid + 1).to(tl.int64)
    row_ptr = tensor_table_ptr + tensor_index * _TABLE_WIDTH
    numel = tl.load(row_ptr)
    block_start = block_index * BLOCK
    offsets = block_start + tl.arange(0, BLOCK)
    offsets = tl.max_contiguous(tl.multiple_of(offsets, BLOCK), BLOCK)
    return row_ptr, numel, offsets, block_start + BLOCK <= numel


@triton.jit
def _stream(row_ptr, COLUMN: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The typed data pointer of one stream of this program's tensor."""
    address = tl.load(row_ptr + COLUMN)
    # one branch per dtype, named: Triton 3.0's pointer_type refuses a constexpr element type
    if DTYPE == tl.float32:
        ptr = address.to(tl.pointer_type(tl.float32))
    elif DTYPE == tl.bfloat16:
        ptr = address.to(tl.pointer_type(tl.bfloat16))
    else:
        tl.static_assert(DTYPE == tl.float16)
        ptr = address.to(tl.pointer_type(tl.float16))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _load(ptr, offsets, mask, FULL: tl.constexpr):
    """Elements of one stream in its own dtype (masked lanes read as 0)."""
    if FULL:
        x = tl.load(ptr + offsets)
    else:
        x = tl.load(ptr + offsets, mask=mask, other=0.0)
    return x


@triton.jit
def _to_fp32(x):
    """A stream's elements widened to fp32, exactly. bf16 is widened by its bits (``bits << 16``),
    what ``cvt.f32.bf16`` does on the GPU: the CPU interpreter's cast flushes or misplaces bf16
    subnormals (below 1.18e-38)."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _round_to_bf16(x):
    """fp32 -> bf16, round to nearest even, by integer arithmetic on the bits.

    The same rounding as ``cvt.rn.bf16.f32`` and torch, written out so that the CPU
    interpreter (whose fp32 -> bf16 cast truncates) computes what the GPU does:
    bits + 0x7FFF + (bit 16 of bits), keep the high half; NaN stays a quiet NaN.
    """
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _stays_finite(ptr, value):
    """Whether fp32 ``value`` stays finite once stored in the 16-bit stream ``ptr`` (the callers
    check fp32 streams not at all, as the torch reference does not)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        return tl.abs(value) < _BF16_OVERFLOW
    else:
        return tl.abs(value) < _FP16_OVERFLOW


@triton.jit
def _store(ptr, offsets, value, mask, FULL: tl.constexpr):
    """Round ``value`` once (to nearest even) to the stream's dtype and store it."""
    if ptr.dtype.element_ty == tl.bfloat16:
        if value.dtype == tl.float32:  # nested: Triton 3.0 compiles no `and` of two dtype comparisons
            value = _round_to_bf16(value)
    value = value.to(ptr.dtype.element_ty)
    if FULL:
        tl.store(ptr + offsets, value)
    else:
        tl.store(ptr + offsets, value, mask=mask)


# --- the update's math -------------------------------------------------------------


@triton.jit
def _scaled_grad(grad, grad_scale_ptr, HAS_GRAD_SCALE: tl.constexpr):
    """g = grad / grad_scale in fp32 (grad itself when there is no scaler)."""
    g = _to_fp32(grad)
    if HAS_GRAD_SCALE:
        g = tl.div_rn(g, tl.load(grad_scale_ptr).to(tl.float32))
    return g


@triton.jit
def _new_moments(g, exp_avg, exp_avg_sq, beta1, beta2, one_minus_beta1, one_minus_beta2):
    """m_new = m*beta1 + g*(1-beta1);  v_new = v*beta2 + (g*g)*(1-beta2)."""
    m_new = exp_avg * beta1 + g * one_minus_beta1
    v_new = exp_avg_sq * beta2 + (g * g) * one_minus_beta2
    return m_new, v_new


@triton.jit
def _preconditioner(v, bias_correction2, eps):
    """1 / (sqrt(v / bc2) + eps)."""
    return tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(v, bias_correction2)) + eps)


@triton.jit
def _direction(precond, g, m, bias_correction1, DIRECTION: tl.constexpr):
    """d = precond * m_hat (momentum) or precond * g (gradient); not called along raw."""
    if DIRECTION == _MOMENTUM:
        d = precond * tl.div_rn(m, bias_correction1)
    else:
        d = precond * g
    return d


@triton.jit
def _stored_direction(row_ptr, offsets, mask, grad_scale_ptr, bias_correction1, bias_correction2,
                      eps, G_DTYPE: tl.constexpr, DIRECTION: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                      ALIGNED: tl.constexpr, FULL: tl.constexpr):
    """d from the moments already written by pass A (reads v and g, or v and m; g alone along raw)."""
    if DIRECTION == _RAW:
        g_ptr = _stream(row_ptr, _GRAD, G_DTYPE, ALIGNED)
        d = _scaled_grad(_load(g_ptr, offsets, mask, FULL), grad_scale_ptr, HAS_GRAD_SCALE)
    else:
        v_ptr = _stream(row_ptr, _EXP_AVG_SQ, tl.float32, ALIGNED)
        precond = _preconditioner(_load(v_ptr, offsets, mask, FULL), bias_correction2, eps)
        if DIRECTION == _MOMENTUM:
            m_ptr = _stream(row_ptr, _EXP_AVG, tl.float32, ALIGNED)
            d = _direction(precond, precond, _load(m_ptr, offsets, mask, FULL), bias_correction1, _MOMENTUM)
        else:
            g_ptr = _stream(row_ptr, _GRAD, G_DTYPE, ALIGNED)
            g = _scaled_grad(_load(g_ptr, offsets, mask, FULL), grad_scale_ptr, HAS_GRAD_SCALE)
            d = _direction(precond, g, g, bias_correction1, _GRADIENT)
    return d


# --- reduction pass: q -----------------------------------------------------------


@triton.jit
def _slope_block(row_ptr, offsets, mask, grad_scale_ptr, beta1, beta2, one_minus_beta1,
                     one_minus_beta2, bias_correction1, bias_correction2, eps,
                     G_DTYPE: tl.constexpr, DIRECTION: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                     ALIGNED: tl.constexpr, FULL: tl.constexpr):
    g_ptr = _stream(row_ptr, _GRAD, G_DTYPE, ALIGNED)
    g = _scaled_grad(_load(g_ptr, offsets, mask, FULL), grad_scale_ptr, HAS_GRAD_SCALE)
    if DIRECTION == _RAW:
        term = g * g
    else:
        m_ptr = _stream(row_ptr, _EXP_AVG, tl.float32, ALIGNED)
        v_ptr = _stream(row_ptr, _EXP_AVG_SQ, tl.float32, ALIGNED)
        # Along the gradient m_new is unused: the compiler drops the load of m (8 bytes/param).
        m_new, v_new = _new_moments(g, _load(m_ptr, offsets, mask, FULL), _load(v_ptr, offsets, mask, FULL),
                                    beta1, beta2, one_minus_beta1, one_minus_beta2)
        precond = _preconditioner(v_new, bias_correction2, eps)
        if DIRECTION == _MOMENTUM:
            term = g * _direction(precond, g, m_new, bias_correction1, _MOMENTUM)
            # where g * g overflows, v_hat is inf and precond 0: the term is NaN, as (g * g) * precond is
            term = tl.where(precond > 0.0, term, float("nan"))
        else:
            term = (g * g) * precond
    if not FULL:
        term = tl.where(mask, term, 0.0)
    return tl.sum(term, axis=0)


@triton.jit
def _slope_kernel(tensor_table_ptr, block_table_ptr, partials_ptr, grad_scale_ptr,
                      beta1, beta2, one_minus_beta1, one_minus_beta2, bias_correction1,
                      bias_correction2, eps,
                      G_DTYPE: tl.constexpr, DIRECTION: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                      ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Partial sums of q = sum g * d with this step's moments (computed, not written).

    partials[b] = sum over block b of  (g*g)*precond  (gradient),  g*(precond*m_hat)  (momentum)
    or  g*g  (raw). Reads g, v (gradient: m_new is not needed), g, m, v (momentum) or g (raw):
    8, 12 or 4 bytes/param in fp32. The caller adds the partials in a fixed order.
    """
    row_ptr, numel, offsets, full = _locate_block(tensor_table_ptr, block_table_ptr, BLOCK)
    if full:
        partial = _slope_block(row_ptr, offsets, None, grad_scale_ptr, beta1, beta2, one_minus_beta1,
                                   one_minus_beta2, bias_correction1, bias_correction2, eps,
                                   G_DTYPE, DIRECTION, HAS_GRAD_SCALE, ALIGNED, True)
    else:
        partial = _slope_block(row_ptr, offsets, offsets < numel, grad_scale_ptr, beta1, beta2,
                                   one_minus_beta1, one_minus_beta2, bias_correction1, bias_correction2,
                                   eps, G_DTYPE, DIRECTION, HAS_GRAD_SCALE, ALIGNED, False)
    tl.store(partials_ptr + tl.program_id(0), partial)


# --- pass A of a plain step --------------------------------------------------------


@triton.jit
def _plain_step_block(w_ptr, g_ptr, m_ptr, v_ptr, offsets, mask, grad_scale_ptr, nonfinite_count_ptr,
                      beta1, beta2, one_minus_beta1, one_minus_beta2, bias_correction1, bias_correction2,
                      eps, decay_factor, neg_step_size, HAS_GRAD_SCALE: tl.constexpr,
                      HAS_COUNTER: tl.constexpr, FULL: tl.constexpr):
    g = _padding_zeroed(_scaled_grad(_load(g_ptr, offsets, mask, FULL), grad_scale_ptr, HAS_GRAD_SCALE), mask,
                        HAS_GRAD_SCALE and HAS_COUNTER and not FULL)
    m = _load(m_ptr, offsets, mask, FULL)
    v = _load(v_ptr, offsets, mask, FULL)
    w = _to_fp32(_load(w_ptr, offsets, mask, FULL))
    m_new, v_new = _new_moments(g, m, v, beta1, beta2, one_minus_beta1, one_minus_beta2)
    update = _direction(_preconditioner(v_new, bias_correction2, eps), g, m_new, bias_correction1, _MOMENTUM)
    w_new = tl.fma(update, neg_step_size, w * decay_factor)
    # g non-finite, or g*g overflowing fp32 (|g| above ~1.8e19), would write v = inf or NaN; a new
    # 16-bit weight can overflow its dtype where its fp32 value does not (the weight alone is kept).
    finite = (g * g) <= _FLT_MAX
    _store(m_ptr, offsets, tl.where(finite, m_new, m), mask, FULL)
    _store(v_ptr, offsets, tl.where(finite, v_new, v), mask, FULL)
    if w_ptr.dtype.element_ty != tl.float32:
        finite = finite & _stays_finite(w_ptr, w_new)
    _store(w_ptr, offsets, tl.where(finite, w_new, w), mask, FULL)
    if HAS_COUNTER:
        _count_nonfinite(finite, nonfinite_count_ptr)


@triton.jit
def _raw_plain_step_block(w_ptr, g_ptr, offsets, mask, grad_scale_ptr, nonfinite_count_ptr, decay_factor,
                          neg_step_size, HAS_GRAD_SCALE: tl.constexpr, HAS_COUNTER: tl.constexpr,
                          FULL: tl.constexpr):
    g = _padding_zeroed(_scaled_grad(_load(g_ptr, offsets, mask, FULL), grad_scale_ptr, HAS_GRAD_SCALE), mask,
                        HAS_GRAD_SCALE and HAS_COUNTER and not FULL)
    w = _to_fp32(_load(w_ptr, offsets, mask, FULL))
    w_new = tl.fma(g, neg_step_size, w * decay_factor)
    finite = tl.abs(g) <= _FLT_MAX
    if w_ptr.dtype.element_ty != tl.float32:
        finite = finite & _stays_finite(w_ptr, w_new)
    _store(w_ptr, offsets, tl.where(finite, w_new, w), mask, FULL)
    if HAS_COUNTER:
        _count_nonfinite(finite, nonfinite_count_ptr)


@triton.jit
def _padding_zeroed(g, mask, ZERO: tl.constexpr):
    """``g`` with a partial block's masked lanes 0 where ``ZERO``: loaded as 0, a GradScaler scale of 0 or NaN
    makes them 0 / scale, NaN, and the count of non-finite elements counted them (nothing is stored there)."""
    if ZERO:
        g = tl.where(mask, g, 0.0)
    return g


@triton.jit
def _count_nonfinite(finite, nonfinite_count_ptr):
    """nonfinite_count += the block's elements that were not finite (one int64 atomic, if any)."""
    n_nonfinite = tl.sum(tl.where(finite, 0, 1), axis=0)
    if n_nonfinite > 0:
        tl.atomic_add(nonfinite_count_ptr, n_nonfinite.to(tl.int64))


@triton.jit
def _plain_step_kernel(tensor_table_ptr, block_table_ptr, loss_ptr, found_inf_ptr, grad_scale_ptr,
                       nonfinite_count_ptr, step_counts_ptr, beta1, beta2, one_minus_beta1, one_minus_beta2,
                       bias_correction1, bias_correction2, eps, decay_factor, neg_step_size,
                       W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, DIRECTION: tl.constexpr,
                       HAS_FOUND_INF: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_COUNTER: tl.constexpr,
                       HAS_STEP_COUNTS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Adam-direction step (DIRECTION momentum) or raw-gradient step with the step guard on the device.

    Adam:  w = w * decay_factor - step_size * m_hat * precond  (fma),  m, v = m_new, v_new.
    raw:   w = w * decay_factor - step_size * g  (fma); m, v neither read nor written.
    Nothing is written when the loss is non-finite or found_inf != 0. An element whose g*g
    (raw: g) is non-finite (g NaN/inf, or |g| > ~1.8e19) keeps w, m, v; one whose new 16-bit weight
    would overflow its dtype keeps w. Their number is added to nonfinite_count (int64 atomics). With HAS_STEP_COUNTS, program 0 adds
    [loss non-finite and found_inf == 0, found_inf != 0] to step_counts[0:2] (the step's own counters).
    Reads w, g, m, v and writes w, m, v: 28 bytes/param in fp32 (raw: reads w, g, writes w: 12).
    """
    # Two levels of dependent loads before the data: the loss, found_inf and this program's
    # block-map entry are independent of each other; numel and the four stream pointers all
    # come from the one table row the entry names. Loading them before any branch lets them
    # issue together (a branch first would order loss -> map -> numel -> pointers).
    loss = tl.load(loss_ptr).to(tl.float32)
    if HAS_FOUND_INF:
        found_inf = tl.load(found_inf_ptr).to(tl.float32)
    row_ptr, numel, offsets, full = _locate_block(tensor_table_ptr, block_table_ptr, BLOCK)
    w_ptr = _stream(row_ptr, _PARAM, W_DTYPE, ALIGNED)
    g_ptr = _stream(row_ptr, _GRAD, G_DTYPE, ALIGNED)
    m_ptr = _stream(row_ptr, _EXP_AVG, tl.float32, ALIGNED)
    v_ptr = _stream(row_ptr, _EXP_AVG_SQ, tl.float32, ALIGNED)
    loss_ok = tl.abs(loss) <= _FLT_MAX
    step_ok = loss_ok
    if HAS_FOUND_INF:
        step_ok = step_ok & (found_inf == 0.0)
    if HAS_STEP_COUNTS:
        # One masked atomic from program 0, no branch: a branch here held 5-6 more registers
        # across the data streams (ptxas -v, sm_90a), costing the 16-bit step a block per SM.
        pair = tl.arange(0, 2)
        flags = tl.where(pair == 0, tl.where(loss_ok, 0, 1), 0)
        if HAS_FOUND_INF:  # a step the scaler skips is its skip, not also a NaN loss
            flags = tl.where(pair == 0, tl.where(loss_ok | (found_inf != 0.0), 0, 1), flags)
            flags = tl.where(pair == 1, tl.where(found_inf == 0.0, 0, 1), flags)
            counters = 2
        else:
            counters = 1
        # pair + 2 * program < counters: only program 0, and only the counters this launch has
        tl.atomic_add(step_counts_ptr + pair, flags.to(tl.int64), mask=pair + 2 * tl.program_id(0) < counters)
    if step_ok:
        if DIRECTION == _RAW:  # m_ptr, v_ptr unused: their loads are dropped
            if full:
                _raw_plain_step_block(w_ptr, g_ptr, offsets, None, grad_scale_ptr, nonfinite_count_ptr,
                                      decay_factor, neg_step_size, HAS_GRAD_SCALE, HAS_COUNTER, True)
            else:
                _raw_plain_step_block(w_ptr, g_ptr, offsets, offsets < numel, grad_scale_ptr, nonfinite_count_ptr,
                                      decay_factor, neg_step_size, HAS_GRAD_SCALE, HAS_COUNTER, False)
        elif full:
            _plain_step_block(w_ptr, g_ptr, m_ptr, v_ptr, offsets, None, grad_scale_ptr, nonfinite_count_ptr,
                              beta1, beta2, one_minus_beta1, one_minus_beta2, bias_correction1,
                              bias_correction2, eps, decay_factor, neg_step_size, HAS_GRAD_SCALE,
                              HAS_COUNTER, True)
        else:
            _plain_step_block(w_ptr, g_ptr, m_ptr, v_ptr, offsets, offsets < numel, grad_scale_ptr,
                              nonfinite_count_ptr, beta1, beta2, one_minus_beta1, one_minus_beta2,
                              bias_correction1, bias_correction2, eps, decay_factor, neg_step_size,
                              HAS_GRAD_SCALE, HAS_COUNTER, False)


# --- pass A of a search step -------------------------------------------------------


@triton.jit
def _first_trial_block(row_ptr, offsets, mask, grad_scale_ptr, beta1, beta2, one_minus_beta1,
                       one_minus_beta2, bias_correction1, bias_correction2, eps, decay_factor,
                       neg_step_size, W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                       DIRECTION: tl.constexpr, HAS_SAVED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                       ALIGNED: tl.constexpr, FULL: tl.constexpr):
    w_ptr = _stream(row_ptr, _PARAM, W_DTYPE, ALIGNED)
    g_ptr = _stream(row_ptr, _GRAD, G_DTYPE, ALIGNED)
    m_ptr = _stream(row_ptr, _EXP_AVG, tl.float32, ALIGNED)  # unused along raw: the loads are dropped
    v_ptr = _stream(row_ptr, _EXP_AVG_SQ, tl.float32, ALIGNED)
    g = _scaled_grad(_load(g_ptr, offsets, mask, FULL), grad_scale_ptr, HAS_GRAD_SCALE)
    if DIRECTION == _RAW:
        w = _load(w_ptr, offsets, mask, FULL)
        if HAS_SAVED:
            _store(_stream(row_ptr, _SAVED, W_DTYPE, ALIGNED), offsets, w, mask, FULL)
        d = g
    else:
        m_new, v_new = _new_moments(g, _load(m_ptr, offsets, mask, FULL), _load(v_ptr, offsets, mask, FULL),
                                    beta1, beta2, one_minus_beta1, one_minus_beta2)
        _store(m_ptr, offsets, m_new, mask, FULL)
        _store(v_ptr, offsets, v_new, mask, FULL)
        w = _load(w_ptr, offsets, mask, FULL)
        if HAS_SAVED:
            _store(_stream(row_ptr, _SAVED, W_DTYPE, ALIGNED), offsets, w, mask, FULL)
        d = _direction(_preconditioner(v_new, bias_correction2, eps), g, m_new, bias_correction1, DIRECTION)
    _store(w_ptr, offsets, tl.fma(d, neg_step_size, _to_fp32(w) * decay_factor), mask, FULL)


@triton.jit
def _first_trial_kernel(tensor_table_ptr, block_table_ptr, grad_scale_ptr, beta1, beta2,
                        one_minus_beta1, one_minus_beta2, bias_correction1, bias_correction2, eps,
                        decay_factor, neg_step_size, W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                        DIRECTION: tl.constexpr, HAS_SAVED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                        ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Moments, saved copy and first trial weights of a search step.

    m, v = m_new, v_new (not along raw);  saved = w (HAS_SAVED);  w = w * decay_factor - step_size * d  (fma).
    Reads w, g, m, v; writes m, v, w and the saved copy: 32 bytes/param in fp32 (28 in place);
    raw reads w, g and writes w and the copy: 16 (12 in place).
    """
    row_ptr, numel, offsets, full = _locate_block(tensor_table_ptr, block_table_ptr, BLOCK)
    if full:
        _first_trial_block(row_ptr, offsets, None, grad_scale_ptr, beta1, beta2, one_minus_beta1,
                           one_minus_beta2, bias_correction1, bias_correction2, eps, decay_factor,
                           neg_step_size, W_DTYPE, G_DTYPE, DIRECTION, HAS_SAVED, HAS_GRAD_SCALE, ALIGNED,
                           True)
    else:
        _first_trial_block(row_ptr, offsets, offsets < numel, grad_scale_ptr, beta1, beta2,
                           one_minus_beta1, one_minus_beta2, bias_correction1, bias_correction2, eps,
                           decay_factor, neg_step_size, W_DTYPE, G_DTYPE, DIRECTION, HAS_SAVED,
                           HAS_GRAD_SCALE, ALIGNED, False)


# --- pass B: further trials --------------------------------------------------------


@triton.jit
def _retrial_block(row_ptr, offsets, mask, grad_scale_ptr, bias_correction1, bias_correction2, eps,
                   decay_factor, neg_step_size, step_size_change, W_DTYPE: tl.constexpr,
                   G_DTYPE: tl.constexpr, DIRECTION: tl.constexpr, HAS_SAVED: tl.constexpr,
                   HAS_GRAD_SCALE: tl.constexpr, ALIGNED: tl.constexpr, FULL: tl.constexpr):
    d = _stored_direction(row_ptr, offsets, mask, grad_scale_ptr, bias_correction1, bias_correction2,
                          eps, G_DTYPE, DIRECTION, HAS_GRAD_SCALE, ALIGNED, FULL)
    w_ptr = _stream(row_ptr, _PARAM, W_DTYPE, ALIGNED)
    if HAS_SAVED:
        saved = _load(_stream(row_ptr, _SAVED, W_DTYPE, ALIGNED), offsets, mask, FULL)
        w_new = tl.fma(d, neg_step_size, _to_fp32(saved) * decay_factor)
    else:
        w_new = _to_fp32(_load(w_ptr, offsets, mask, FULL)) + d * step_size_change
    _store(w_ptr, offsets, w_new, mask, FULL)


@triton.jit
def _retrial_kernel(tensor_table_ptr, block_table_ptr, grad_scale_ptr, bias_correction1,
                    bias_correction2, eps, decay_factor, neg_step_size, step_size_change,
                    W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, DIRECTION: tl.constexpr,
                    HAS_SAVED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, ALIGNED: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Move the weights to the next trial along d (from the stored, updated moments).

    HAS_SAVED:  w = saved * decay_factor - step_size * d  (fma, exact trial point)
    in place:   w = w + d * (previous_step_size - step_size)  (one rounding per trial)
    Reads saved or w, g or m, v; writes w: 16 bytes/param in fp32 (raw: saved or w, g; 12).
    """
    row_ptr, numel, offsets, full = _locate_block(tensor_table_ptr, block_table_ptr, BLOCK)
    if full:
        _retrial_block(row_ptr, offsets, None, grad_scale_ptr, bias_correction1, bias_correction2, eps,
                       decay_factor, neg_step_size, step_size_change, W_DTYPE, G_DTYPE, DIRECTION,
                       HAS_SAVED, HAS_GRAD_SCALE, ALIGNED, True)
    else:
        _retrial_block(row_ptr, offsets, offsets < numel, grad_scale_ptr, bias_correction1,
                       bias_correction2, eps, decay_factor, neg_step_size, step_size_change, W_DTYPE,
                       G_DTYPE, DIRECTION, HAS_SAVED, HAS_GRAD_SCALE, ALIGNED, False)


# --- restore -------------------------------------------------------------------------


@triton.jit
def _restore_block(row_ptr, offsets, mask, grad_scale_ptr, bias_correction1, bias_correction2, eps,
                   decay_factor, previous_step_size, W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                   DIRECTION: tl.constexpr, HAS_SAVED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                   ALIGNED: tl.constexpr, FULL: tl.constexpr):
    w_ptr = _stream(row_ptr, _PARAM, W_DTYPE, ALIGNED)
    if HAS_SAVED:
        saved = _load(_stream(row_ptr, _SAVED, W_DTYPE, ALIGNED), offsets, mask, FULL)
        _store(w_ptr, offsets, saved, mask, FULL)
    else:
        d = _stored_direction(row_ptr, offsets, mask, grad_scale_ptr, bias_correction1, bias_correction2,
                              eps, G_DTYPE, DIRECTION, HAS_GRAD_SCALE, ALIGNED, FULL)
        w = _to_fp32(_load(w_ptr, offsets, mask, FULL))
        _store(w_ptr, offsets, tl.div_rn(tl.fma(d, previous_step_size, w), decay_factor), mask, FULL)


@triton.jit
def _restore_kernel(tensor_table_ptr, block_table_ptr, grad_scale_ptr, bias_correction1,
                    bias_correction2, eps, decay_factor, previous_step_size, W_DTYPE: tl.constexpr,
                    G_DTYPE: tl.constexpr, DIRECTION: tl.constexpr, HAS_SAVED: tl.constexpr,
                    HAS_GRAD_SCALE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Put back the weights from before the step.

    HAS_SAVED:  w = saved  (exact; reads saved, writes w: 8 bytes/param in fp32)
    in place:   w = (w + previous_step_size * d) / decay_factor  (to rounding; 16 bytes/param, raw 12)
    """
    row_ptr, numel, offsets, full = _locate_block(tensor_table_ptr, block_table_ptr, BLOCK)
    if full:
        _restore_block(row_ptr, offsets, None, grad_scale_ptr, bias_correction1, bias_correction2, eps,
                       decay_factor, previous_step_size, W_DTYPE, G_DTYPE, DIRECTION, HAS_SAVED,
                       HAS_GRAD_SCALE, ALIGNED, True)
    else:
        _restore_block(row_ptr, offsets, offsets < numel, grad_scale_ptr, bias_correction1,
                       bias_correction2, eps, decay_factor, previous_step_size, W_DTYPE, G_DTYPE,
                       DIRECTION, HAS_SAVED, HAS_GRAD_SCALE, ALIGNED, False)
