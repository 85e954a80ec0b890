/* Gathered dot products, out[e] = q[i] . table[keys[e]] for the entries e of query i.
 *
 * torch.sparse.sampled_addmm does this on the CPU with one scalar dot per entry and no
 * prefetching: the rows of `table` are read in an order it cannot predict. This loop fetches
 * the row AHEAD entries ahead while it multiplies the current one. Built by
 * diffuser_graph.engines.native on first use; one call handles queries [first, last), so
 * callers can split the queries between threads.
 */
#include <stdint.h>

#define AHEAD 16 /* entries between a row's prefetch and its use */
#define LINE 64  /* bytes per cache line */

#define GATHERED_DOT(NAME, T)                                                                  \
    void NAME(const T *q, const T *table, const int64_t *offsets, const int64_t *keys,       \
              T *out, int64_t first, int64_t last, int64_t dim, int accumulate) {             \
        const int64_t end = offsets[last];                                                     \
        const int64_t row_bytes = dim * (int64_t)sizeof(T);                                   \
        for (int64_t i = first; i < last; ++i) {                                               \
            const T *qi = q + i * dim;                                                         \
            for (int64_t e = offsets[i]; e < offsets[i + 1]; ++e) {                            \
                if (e + AHEAD < end) {                                                         \
                    const char *next = (const char *)(table + keys[e + AHEAD] * dim);          \
                    for (int64_t b = 0; b < row_bytes; b += LINE)                              \
                        __builtin_prefetch(next + b, 0, 0);                                    \
                }                                                                              \
                const T *row = table + keys[e] * dim;                                          \
                T sum = 0;                                                                     \
                for (int64_t d = 0; d < dim; ++d)                                              \
                    sum += qi[d] * row[d];                                                     \
                out[e] = accumulate ? out[e] + sum : sum;                                      \
            }                                                                                  \
        }                                                                                      \
    }

GATHERED_DOT(gathered_dot_float, float)
GATHERED_DOT(gathered_dot_double, double)
