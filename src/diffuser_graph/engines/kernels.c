/* The block engine's compiled loops; built by diffuser_graph.engines.native on first use. Each
 * call splits its rows between `threads` threads of the OpenMP runtime torch runs on (the
 * library is loaded after torch, so its libgomp is torch's own): threads of our own would
 * compete for the cores with torch's, which spin for a while after each of torch's ops.
 *
 * Gathered dot products, out[e] = q[i] . table[keys[e]] for the entries e of query i:
 * torch.sparse.sampled_addmm does this on the CPU with one scalar dot per entry and no
 * prefetching: the rows of `table` are read in an order it cannot predict. This loop fetches
 * the row AHEAD entries ahead while it multiplies the current one, and the common head sizes
 * get a loop of constant length the compiler unrolls into vector code (1.7x faster than a
 * runtime length at 64).
 *
 * The joint softmax of a query's band, global-key and (packed) random-key scores, and its
 * backward, one row at a time: in torch it takes a rectangular copy of the random keys (their
 * longest row wide), a temporary per step and a pass over memory per step; here every row
 * stays in the L1 cache from its maximum to its normalisation.
 */
#include <stdint.h>

#define CHUNK 64 /* rows per share of the work handed to a thread */

/* CALL(first, last) for the rows [0, rows) in shares of CHUNK rows, on `threads` threads */
#define IN_PARALLEL(rows, threads, CALL)                                                       \
    _Pragma("omp parallel for schedule(dynamic) num_threads(threads)")                        \
    for (int64_t share = 0; share < ((rows) + CHUNK - 1) / CHUNK; ++share) {                   \
        const int64_t first = share * CHUNK;                                                   \
        const int64_t last = first + CHUNK < (rows) ? first + CHUNK : (rows);                  \
        CALL;                                                                                  \
    }

#define AHEAD 16 /* entries between a row's prefetch and its use */
#define LINE 64  /* bytes per cache line */

#define QUERIES(T, DIM)                                                                        \
    for (int64_t i = first; i < last; ++i) {                                                   \
        const T *qi = q + i * (DIM);                                                           \
        for (int64_t e = offsets[i]; e < offsets[i + 1]; ++e) {                                \
            if (e + AHEAD < end) {                                                             \
                const char *next = (const char *)(table + keys[e + AHEAD] * (DIM));            \
                for (int64_t b = 0; b < (DIM) * (int64_t)sizeof(T); b += LINE)                 \
                    __builtin_prefetch(next + b, 0, 0);                                        \
            }                                                                                  \
            const T *row = table + keys[e] * (DIM);                                            \
            T sum = 0;                                                                         \
            for (int64_t d = 0; d < (DIM); ++d)                                                \
                sum += qi[d] * row[d];                                                         \
            out[e] = accumulate ? out[e] + sum : sum;                                          \
        }                                                                                      \
    }

#define GATHERED_DOT(NAME, T)                                                                  \
    static void NAME##_rows(const T *q, const T *table, const int64_t *offsets,               \
                            const int64_t *keys, T *out, int64_t first, int64_t last,         \
                            int64_t dim, int accumulate) {                                     \
        const int64_t end = offsets[last];                                                     \
        switch (dim) {                                                                         \
        case 16: QUERIES(T, 16) break;                                                         \
        case 32: QUERIES(T, 32) break;                                                         \
        case 64: QUERIES(T, 64) break;                                                         \
        case 128: QUERIES(T, 128) break;                                                       \
        default: QUERIES(T, dim)                                                               \
        }                                                                                      \
    }                                                                                          \
    void NAME(const T *q, const T *table, const int64_t *offsets, const int64_t *keys,       \
              T *out, int64_t rows, int64_t dim, int accumulate, int threads) {                \
        IN_PARALLEL(rows, threads,                                                             \
                    NAME##_rows(q, table, offsets, keys, out, first, last, dim, accumulate))  \
    }

GATHERED_DOT(gathered_dot_float, float)
GATHERED_DOT(gathered_dot_double, double)

/* exp(x) for float32 within 2 ulp (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r,
 * times 2^n), 0 below the smallest normal result and for -inf, NaN for NaN. libm's expf is
 * vectorised only under -ffast-math, which also assumes there are no infinities, and the
 * masks are -inf; this one is plain arithmetic the compiler vectorises. */
static inline float exp_float(float x) {
    const float low = -87.33654f;
    float c = x >= low ? x : low;  /* NaN and -inf: low, so the integer conversion is defined */
    float n = __builtin_floorf(c * 1.44269504088896341f + 0.5f);
    float r = c - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) * (1 << 23);
    float scale;
    __builtin_memcpy(&scale, &bits, sizeof scale);
    return x >= low ? p * scale : (x < low ? 0.0f : x);
}

static inline double exp_double(double x) { return __builtin_exp(x); }

/* One row's steps for each part of it, as functions of their own so that each loop vectorises:
 * add the bias (if any) and return the maximum of s and top (by whole vectors: a scalar
 * maximum does not vectorise without -ffinite-math-only, and the masks are -inf); exponentiate
 * less top and return the sum; scale; the backward's sum of p * d and p * (d - total). */
#define ROW_STEPS(T, INT, EXP)                                                                 \
    typedef T T##_lanes __attribute__((vector_size(32)));                                      \
    typedef INT T##_mask __attribute__((vector_size(32)));                                     \
    enum { T##_LANES = 32 / sizeof(T) };                                                       \
    static inline T biased_max_##T(T *restrict s, const T *restrict bias, int64_t width,      \
                                   T top) {                                                    \
        if (bias)                                                                              \
            for (int64_t j = 0; j < width; ++j)                                                \
                s[j] += bias[j];                                                               \
        T##_lanes most = {0};                                                                  \
        most += top;                                                                           \
        int64_t j = 0;                                                                         \
        for (; j + T##_LANES <= width; j += T##_LANES) {                                       \
            T##_lanes x;                                                                       \
            __builtin_memcpy(&x, s + j, sizeof x);                                             \
            T##_mask above = x > most;                                                         \
            most = (T##_lanes)((above & (T##_mask)x) | (~above & (T##_mask)most));             \
        }                                                                                      \
        for (int l = 0; l < T##_LANES; ++l)                                                    \
            top = most[l] > top ? most[l] : top;                                               \
        for (; j < width; ++j)                                                                 \
            top = s[j] > top ? s[j] : top;                                                     \
        return top;                                                                            \
    }                                                                                          \
    static inline T exp_sum_##T(T *restrict s, int64_t width, T top) {                         \
        for (int64_t j = 0; j < width; ++j)                                                    \
            s[j] = EXP(s[j] - top);                                                            \
        T total = 0; /* a loop of its own: summed in the same loop, it does not vectorise */   \
        for (int64_t j = 0; j < width; ++j)                                                    \
            total += s[j];                                                                     \
        return total;                                                                          \
    }                                                                                          \
    static inline void scale_##T(T *restrict s, int64_t width, T factor) {                    \
        for (int64_t j = 0; j < width; ++j)                                                    \
            s[j] *= factor;                                                                    \
    }                                                                                          \
    static inline T dot_##T(const T *restrict p, const T *restrict d, int64_t width) {        \
        T total = 0;                                                                           \
        for (int64_t j = 0; j < width; ++j)                                                    \
            total += p[j] * d[j];                                                              \
        return total;                                                                          \
    }                                                                                          \
    static inline void grad_##T(T *out, const T *restrict p, const T *d, int64_t width,       \
                                T total) {                                                     \
        for (int64_t j = 0; j < width; ++j)                                                    \
            out[j] = p[j] * (d[j] - total);                                                    \
    }

ROW_STEPS(float, int32_t, exp_float)
ROW_STEPS(double, int64_t, exp_double)

/* In place, for every row: band (rows, band_width), globals (rows, global_width) and
 * the packed random scores of row r, random[bounds[r]:bounds[r + 1]], become one softmax.
 * Row r adds row r % bias_rows of band_bias and of global_bias (either may be NULL). */
#define JOINT_SOFTMAX(NAME, T)                                                                 \
    static void NAME##_rows(T *band, const T *band_bias, int64_t band_width, T *globals,     \
                            const T *global_bias, int64_t global_width, T *random,            \
                            const int64_t *bounds, int64_t bias_rows, int64_t first,          \
                            int64_t last) {                                                    \
        for (int64_t r = first; r < last; ++r) {                                               \
            T *b = band + r * band_width, *g = globals + r * global_width;                     \
            T *x = random + bounds[r];                                                         \
            const int64_t count = bounds[r + 1] - bounds[r], bias_row = r % bias_rows;        \
            const T *bb = band_bias ? band_bias + bias_row * band_width : 0;                   \
            const T *gb = global_bias ? global_bias + bias_row * global_width : 0;            \
            T top = biased_max_##T(b, bb, band_width, -__builtin_inf());                       \
            top = biased_max_##T(g, gb, global_width, top);                                    \
            top = biased_max_##T(x, 0, count, top);                                            \
            const T total = exp_sum_##T(b, band_width, top) +                                  \
                            exp_sum_##T(g, global_width, top) + exp_sum_##T(x, count, top);   \
            scale_##T(b, band_width, 1 / total);                                               \
            scale_##T(g, global_width, 1 / total);                                             \
            scale_##T(x, count, 1 / total);                                                    \
        }                                                                                      \
    }                                                                                          \
    void NAME(T *band, const T *band_bias, int64_t band_width, T *globals,                   \
              const T *global_bias, int64_t global_width, T *random, const int64_t *bounds,  \
              int64_t bias_rows, int64_t rows, int threads) {                                  \
        IN_PARALLEL(rows, threads, NAME##_rows(band, band_bias, band_width, globals,         \
                                               global_bias, global_width, random, bounds,     \
                                               bias_rows, first, last))                       \
    }

/* The softmax's backward, out = p * (grad - sum over the whole row of p * grad), for the three
 * parts laid out as JOINT_SOFTMAX's (out may be grad itself). */
#define JOINT_SOFTMAX_BACKWARD(NAME, T)                                                        \
    static void NAME##_rows(const T *band, const T *band_grad, T *band_out,                   \
                            int64_t band_width, const T *globals, const T *global_grad,       \
                            T *global_out, int64_t global_width, const T *random,             \
                            const T *random_grad, T *random_out, const int64_t *bounds,       \
                            int64_t first, int64_t last) {                                     \
        for (int64_t r = first; r < last; ++r) {                                               \
            const int64_t at = r * band_width, to = r * global_width, from = bounds[r];       \
            const int64_t count = bounds[r + 1] - from;                                        \
            const T total = dot_##T(band + at, band_grad + at, band_width) +                   \
                            dot_##T(globals + to, global_grad + to, global_width) +            \
                            dot_##T(random + from, random_grad + from, count);                 \
            grad_##T(band_out + at, band + at, band_grad + at, band_width, total);            \
            grad_##T(global_out + to, globals + to, global_grad + to, global_width, total);   \
            grad_##T(random_out + from, random + from, random_grad + from, count, total);      \
        }                                                                                      \
    }                                                                                          \
    void NAME(const T *band, const T *band_grad, T *band_out, int64_t band_width,             \
              const T *globals, const T *global_grad, T *global_out, int64_t global_width,    \
              const T *random, const T *random_grad, T *random_out, const int64_t *bounds,     \
              int64_t rows, int threads) {                                                     \
        IN_PARALLEL(rows, threads, NAME##_rows(band, band_grad, band_out, band_width,        \
                                               globals, global_grad, global_out,              \
                                               global_width, random, random_grad,             \
                                               random_out, bounds, first, last))              \
    }

JOINT_SOFTMAX(joint_softmax_float, float)
JOINT_SOFTMAX(joint_softmax_double, double)
JOINT_SOFTMAX_BACKWARD(joint_softmax_backward_float, float)
JOINT_SOFTMAX_BACKWARD(joint_softmax_backward_double, double)
