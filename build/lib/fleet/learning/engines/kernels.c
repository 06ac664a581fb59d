/* Fused CPU kernels for the fused engine's bf16 mode (fleet/learning/engines/native.py builds
 * this file with the machine's C compiler and loads it with ctypes; fused_native.py calls it).
 *
 * What they fuse, and why: at a device's batch (16 rows) every elementwise PyTorch op of the
 * LSTM cell costs a few microseconds of dispatch for a few microseconds of work, and a bf16
 * weight update is three passes (a cast, a mixed-dtype add, a cast back). Here each timestep's
 * gate arithmetic is one call, the softmax cross-entropy and its gradient are one call, and a
 * weight update writes the fp32 master and its bf16 copy in one pass.
 *
 * Precision contract (the same as the PyTorch bf16 path): all arithmetic is fp32; bf16 appears
 * only as the storage of GEMM operands and products, each rounded once to nearest-even. The
 * fp32 masters, the weight updates, the recurrence state and the loss stay fp32.
 *
 * bf16 is stored as uint16_t (the top half of an fp32). Arrays are dense and row-major; the
 * caller (fused_native.py) checks every shape and dtype before the first call.
 */
#include <math.h>
#include <stdint.h>

int fleet_kernels_abi(void) { return 1; }

static inline float bf2f(uint16_t v) {
    union { uint32_t u; float f; } x;
    x.u = (uint32_t)v << 16;
    return x.f;
}

static inline uint16_t f2bf(float f) { /* round to nearest, ties to even */
    union { uint32_t u; float f; } x;
    x.f = f;
    uint32_t u = x.u;
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* e^x to about 4e-6 relative for |x| < 87 (clamped beyond): 2^(x log2 e) as 2^n times a
 * degree-5 polynomial in the fraction. It vectorises without a vector math library, and what
 * it feeds is rounded to bf16 (3.9e-3 relative) or multiplies a bf16-rounded operand, so libm's
 * last bits would buy nothing. */
static inline float fexp(float x) {
    float y = x * 1.44269504f;
    y = y < -126.0f ? -126.0f : (y > 126.0f ? 126.0f : y);
    float n = __builtin_floorf(y);
    float f = y - n;
    float p = 1.8775767e-3f;
    p = p * f + 8.9893397e-3f;
    p = p * f + 5.5826318e-2f;
    p = p * f + 2.4015361e-1f;
    p = p * f + 6.9315308e-1f;
    p = p * f + 9.9999994e-1f;
    union { uint32_t u; float f; } b;
    b.u = (uint32_t)((int32_t)n + 127) << 23;
    return p * b.f;
}

static inline float sigm(float x) { return 1.0f / (1.0f + fexp(-x)); }

/* One timestep forward for b rows. The gates are blocks of hd columns: o, i, g (CIFG, gates =
 * 3) or o, i, f, g (LSTM, gates = 4). Pre-activation = zlo (input-to-gates, bf16) + bias + zr
 * (r_{s-1} w_r, NULL at the first step); z gets the activated gates, c1 the new cell state,
 * tc = tanh(c1) and h = o tanh(c1). tanh(x) = 2 sigmoid(2x) - 1. */
void cell_forward(int b, int hd, int gates, const uint16_t *restrict zlo, const float *restrict bias,
                  const float *restrict zr, float *restrict z, const float *restrict c0,
                  float *restrict c1, float *restrict tc, float *restrict h) {
    int gh = gates * hd;
    for (int r = 0; r < b; r++) {
        const uint16_t *zl = zlo + (int64_t)r * gh;
        float *zo = z + (int64_t)r * gh;
        if (zr) {
            const float *zz = zr + (int64_t)r * gh;
            for (int j = 0; j < gh; j++) zo[j] = bf2f(zl[j]) + bias[j] + zz[j];
        } else {
            for (int j = 0; j < gh; j++) zo[j] = bf2f(zl[j]) + bias[j];
        }
        float *o = zo, *i = zo + hd, *f = zo + 2 * hd, *g = zo + (gates - 1) * hd;
        const float *cp = c0 + (int64_t)r * hd;
        float *cn = c1 + (int64_t)r * hd, *t = tc + (int64_t)r * hd, *hh = h + (int64_t)r * hd;
        if (gates == 3) {
            for (int j = 0; j < hd; j++) {
                float oo = sigm(o[j]), ii = sigm(i[j]), gg = 2.0f * sigm(2.0f * g[j]) - 1.0f;
                float c = cp[j] + ii * (gg - cp[j]); /* (1 - i) c + i g */
                float th = 2.0f * sigm(2.0f * c) - 1.0f;
                o[j] = oo, i[j] = ii, g[j] = gg, cn[j] = c, t[j] = th, hh[j] = oo * th;
            }
        } else {
            for (int j = 0; j < hd; j++) {
                float oo = sigm(o[j]), ii = sigm(i[j]), ff = sigm(f[j]);
                float gg = 2.0f * sigm(2.0f * g[j]) - 1.0f;
                float c = ff * cp[j] + ii * gg;
                float th = 2.0f * sigm(2.0f * c) - 1.0f;
                o[j] = oo, i[j] = ii, f[j] = ff, g[j] = gg, cn[j] = c, t[j] = th, hh[j] = oo * th;
            }
        }
    }
}

/* One timestep backward for b rows, from dh = d loss / d h_s and dc = d loss / d c_s carried
 * from step s + 1 (zero at the last step). z holds the activated gates of step s, cp = c_{s-1},
 * tc = tanh(c_s). Writes the gate gradients to m (fp32, for the recurrence) and mlo (bf16, for
 * the weight-gradient GEMMs), adds them into gbias, and leaves dc = d loss / d c_{s-1}. */
void cell_backward(int b, int hd, int gates, const float *restrict dh, const float *restrict z,
                   const float *restrict cp, const float *restrict tc, float *restrict dc,
                   float *restrict m, uint16_t *restrict mlo, float *restrict gbias) {
    int gh = gates * hd;
    for (int r = 0; r < b; r++) {
        const float *zz = z + (int64_t)r * gh, *d = dh + (int64_t)r * hd;
        const float *c = cp + (int64_t)r * hd, *t = tc + (int64_t)r * hd;
        float *dcr = dc + (int64_t)r * hd, *mm = m + (int64_t)r * gh;
        const float *o = zz, *i = zz + hd, *f = zz + 2 * hd, *g = zz + (gates - 1) * hd;
        float *mo = mm, *mi = mm + hd, *mf = mm + 2 * hd, *mg = mm + (gates - 1) * hd;
        if (gates == 3) {
            for (int j = 0; j < hd; j++) {
                float oo = o[j], ii = i[j], gg = g[j], th = t[j];
                float dcc = dcr[j] + d[j] * oo * (1.0f - th * th);
                mo[j] = d[j] * th * oo * (1.0f - oo);
                mi[j] = dcc * (gg - c[j]) * ii * (1.0f - ii);
                mg[j] = dcc * ii * (1.0f - gg * gg);
                dcr[j] = dcc * (1.0f - ii);
            }
        } else {
            for (int j = 0; j < hd; j++) {
                float oo = o[j], ii = i[j], ff = f[j], gg = g[j], th = t[j];
                float dcc = dcr[j] + d[j] * oo * (1.0f - th * th);
                mo[j] = d[j] * th * oo * (1.0f - oo);
                mi[j] = dcc * gg * ii * (1.0f - ii);
                mf[j] = dcc * c[j] * ff * (1.0f - ff);
                mg[j] = dcc * ii * (1.0f - gg * gg);
                dcr[j] = dcc * ff;
            }
        }
        uint16_t *ml = mlo + (int64_t)r * gh;
        for (int j = 0; j < gh; j++) {
            ml[j] = f2bf(mm[j]);
            gbias[j] += mm[j];
        }
    }
}

#define CHUNK 320 /* token columns per chunk: a compile-time width the compiler vectorises */
#define BLOCK 32  /* vocabulary rows per block: BLOCK x CHUNK bf16 stays in L1 */

/* One chunk of w <= CHUNK token columns of x (v words x n tokens, bf16). Pass 1 finds each
 * column's max and its sum of e^(x - max) in one sweep: each block of BLOCK rows gives its max
 * first, the running sum is rescaled to it once, then the block's exponentials are added (the
 * block is in L1 for the second look). Pass 2 writes p = e^(x - max) / sum, rounded once. */
static inline double chunk_xent(int v, int n, int w, uint16_t *restrict x,
                                const int64_t *restrict target, int64_t pad_id) {
    float mx[CHUNK], sum[CHUNK], bm[CHUNK], inv[CHUNK], pt[CHUNK];
    double total = 0.0;
    for (int c = 0; c < w; c++) mx[c] = bf2f(x[c]), sum[c] = 0.0f;
    for (int j0 = 0; j0 < v; j0 += BLOCK) {
        int j1 = j0 + BLOCK < v ? j0 + BLOCK : v;
        for (int c = 0; c < w; c++) bm[c] = mx[c];
        for (int j = j0; j < j1; j++) {
            const uint16_t *row = x + (int64_t)j * n;
            for (int c = 0; c < w; c++) {
                float y = bf2f(row[c]);
                bm[c] = y > bm[c] ? y : bm[c];
            }
        }
        for (int c = 0; c < w; c++) sum[c] *= fexp(mx[c] - bm[c]), mx[c] = bm[c];
        for (int j = j0; j < j1; j++) {
            const uint16_t *row = x + (int64_t)j * n;
            for (int c = 0; c < w; c++) sum[c] += fexp(bf2f(row[c]) - mx[c]);
        }
    }
    for (int c = 0; c < w; c++) {
        int pad = target[c] == pad_id;
        inv[c] = pad ? 0.0f : 1.0f / sum[c];
        pt[c] = pad ? 1.0f : fexp(bf2f(x[target[c] * n + c]) - mx[c]) * inv[c];
        total -= pad ? 0.0 : log(pt[c] > 1e-30f ? pt[c] : 1e-30f);
    }
    for (int j = 0; j < v; j++) {
        uint16_t *row = x + (int64_t)j * n;
        for (int c = 0; c < w; c++) row[c] = f2bf(fexp(bf2f(row[c]) - mx[c]) * inv[c]);
    }
    for (int c = 0; c < w; c++)
        if (target[c] != pad_id) x[target[c] * n + c] = f2bf(pt[c] - 1.0f);
    return total;
}

/* Softmax cross-entropy down the columns of the logits x (v words x n tokens, bf16), in place:
 * column k becomes d loss / d logits = p - onehot(target[k]), or zero for a pad target (its
 * probabilities are scaled by 0). Returns the summed loss -log p[target] of the counted
 * columns. Column layout is what lets every GEMM around it read its operands untransposed. */
double softmax_xent_cols(int v, int n, uint16_t *restrict x, const int64_t *restrict target,
                         int64_t pad_id) {
    double total = 0.0;
    int c0 = 0;
    for (; c0 + CHUNK <= n; c0 += CHUNK) total += chunk_xent(v, n, CHUNK, x + c0, target + c0, pad_id);
    if (c0 < n) total += chunk_xent(v, n, n - c0, x + c0, target + c0, pad_id);
    return total;
}

/* An SGD step on one fp32 master: master += alpha * g (g bf16, or NULL for none), then
 * lo = bf16(master) when lo is given: the update and the refresh of its bf16 copy in one pass. */
void update(int64_t n, float *restrict master, const uint16_t *restrict g, float alpha,
            uint16_t *restrict lo) {
    if (g)
        for (int64_t k = 0; k < n; k++) master[k] += alpha * bf2f(g[k]);
    if (lo)
        for (int64_t k = 0; k < n; k++) lo[k] = f2bf(master[k]);
}

/* The embedding's input-side step: master[idx[k]] += alpha * rows[k] for k < n (rows bf16,
 * d wide), in order (repeated ids add up), each touched row's bf16 copy in lo refreshed. */
void scatter_add_rows(int n, const int64_t *restrict idx, int d, float alpha,
                      const uint16_t *restrict rows, float *restrict master, uint16_t *restrict lo) {
    for (int k = 0; k < n; k++) {
        float *w = master + idx[k] * d;
        uint16_t *l = lo + idx[k] * d;
        const uint16_t *x = rows + (int64_t)k * d;
        for (int j = 0; j < d; j++) {
            float y = w[j] + alpha * bf2f(x[j]);
            w[j] = y, l[j] = f2bf(y);
        }
    }
}
