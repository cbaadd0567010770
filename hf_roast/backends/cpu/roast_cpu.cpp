/* The CPU backend's kernel: a fused gather-GEMV (hf_roast_gemv) and a one-pass W build
   (hf_roast_build_weight) that read z tile by tile, and the dequantisation reader (hf_roast_dequantize).

   This file is not compiled alone: hf_roast/backends/cpu/build.py prepends the mapping and quantisation
   formulas (storage_index, code_of, group_of, dequantize_value, virtual_index, hashednet_slot, hash_sign),
   which hf_roast/backends/cpu/translate.py translates from the Python source of hf_roast/mapping.py and
   hf_roast/quant.py, so that no formula is written twice, and the constants it shares with Python
   (MAX_ROWS, MAX_TILE, ...). roast_cpu_op.cpp follows: the torch ops that fill Args and call these. */

#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stddef.h>

/* One value rounded into a float dtype (R: 0 fp32, 1 bf16, 2 fp16) as the PyTorch path's .to(dtype) does,
   kept as fp32. Branch-free, so that the loops calling it vectorise. */
template <int R>
static inline float round_to(float w) {
  if (R == 1) { /* bfloat16, round to nearest even; NaN stays NaN */
    uint32_t u; memcpy(&u, &w, 4);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    r = ((u & 0x7fffffffu) > 0x7f800000u) ? u : r;
    memcpy(&w, &r, 4);
    return w;
  }
  if (R == 2) return (float)(_Float16)w;
  return w;
}

/* z's storage: fp32, bf16 or fp16 floats (zkind 0, 1, 2), or packed codes and group scales (bits 8, 4). */
struct Z {
  const void* data; int64_t zkind;                            /* float z */
  const void* codes; const float* scales; int64_t bits, group;  /* packed z (bits 0: float) */
};

/* The stored unit of a packed z: int8 codes at 8 bits, bytes of two nibbles at 4 (QuantizedZ.codes_dtype). */
template <int BITS> struct Code { typedef uint8_t type; };
template <> struct Code<8> { typedef int8_t type; };

/* z[index] of a packed z, in fp32: quant.py's element formulas, translated and prepended (see the top).
   A code fits in 32 bits. */
template <int BITS>
static inline float packed_value(const typename Code<BITS>::type* __restrict codes, int64_t index, float scale) {
  const int64_t raw = codes[storage_index(index, BITS)];
  return dequantize_value((float)(int32_t)code_of(raw, index, BITS), scale);
}

/* z[start + k] for k < n of a packed z, in fp32, with each group's scale read once. At 4 bits the values
   go by pairs from an even index (one byte), so that the nibble each reads is known to the compiler. */
template <int BITS>
static void dequantize_span(const Z& z, int64_t start, int64_t n, float* out) {
  const typename Code<BITS>::type* __restrict codes = (const typename Code<BITS>::type*)z.codes;
  const float* scales = z.scales;
  const int64_t group = z.group;
  int64_t k = 0;
  while (k < n) {
    const int64_t g = group_of(start + k, group);
    const float scale = scales[g];
    int64_t end = (g + 1) * group - start; /* first value of the next group (groups are contiguous) */
    if (end > n) end = n;
    if (BITS == 4) {
      if (k < end && ((start + k) & 1)) { out[k] = packed_value<BITS>(codes, start + k, scale); k++; }
      const int64_t half = (start + k) / 2, pairs = (end - k) / 2;
      const typename Code<BITS>::type* __restrict bytes = codes + storage_index(start + k, BITS);
      float* __restrict o = out + k;
      for (int64_t p = 0; p < pairs; p++) {
        const int64_t even = 2 * (half + p), raw = bytes[p]; /* bytes[p]: storage_index(even, BITS) */
        o[2 * p] = dequantize_value((float)(int32_t)code_of(raw, even, BITS), scale);
        o[2 * p + 1] = dequantize_value((float)(int32_t)code_of(raw, even + 1, BITS), scale);
      }
      k += 2 * pairs;
    }
    for (; k < end; k++) out[k] = packed_value<BITS>(codes, start + k, scale);
  }
}

/* z[start : start + n] as fp32 values (exact for every storage: floats widen, codes dequantise). */
static void read_span(const Z& z, int64_t start, int64_t n, float* out) {
  if (z.bits == 8) { dequantize_span<8>(z, start, n, out); return; }
  if (z.bits == 4) { dequantize_span<4>(z, start, n, out); return; }
  if (z.zkind == 0) { memcpy(out, (const float*)z.data + start, n * sizeof(float)); return; }
  const uint16_t* h = (const uint16_t*)z.data + start;
  if (z.zkind == 1) {
    for (int64_t k = 0; k < n; k++) { const uint32_t u = (uint32_t)h[k] << 16; memcpy(out + k, &u, 4); }
  } else {
    for (int64_t k = 0; k < n; k++) { _Float16 f; memcpy(&f, h + k, 2); out[k] = (float)f; }
  }
}

/* One value z[index] (hashednet reads element by element). */
static inline float read_one(const Z& z, int64_t index) {
  if (z.bits == 8) return packed_value<8>((const int8_t*)z.codes, index, z.scales[group_of(index, z.group)]);
  if (z.bits == 4) return packed_value<4>((const uint8_t*)z.codes, index, z.scales[group_of(index, z.group)]);
  if (z.zkind == 0) return ((const float*)z.data)[index];
  float v;
  read_span(z, index, 1, &v);
  return v;
}

static int hf_roast_dequantize(const void* codes, const float* scales, int64_t bits, int64_t group,
                                   int64_t start, int64_t n, float* out) {
  if (bits != 8 && bits != 4) return 1;
  Z z = {nullptr, 0, codes, scales, bits, group};
  read_span(z, start, n, out);
  return 0;
}

struct Args {
  const float* x; int64_t n_rows; int64_t cols;      /* x: n_rows x cols, fp32, contiguous */
  Z z;
  const int64_t* tile_slot; const float* tile_scale;  /* LayerMapping tables (tile_slot NULL: hashednet) */
  int64_t rows, tr, tc, n_tr, n_tc;
  int64_t build;        /* 0: read fp32 z tiles directly (scale after the dot); 1: build each tile first */
  int64_t rounding;     /* 0 fp32, 1 bf16, 2 fp16 */
  int64_t element_sign, tile_offset, segment_start, segment_size;
  int64_t slot_a, slot_b, sign_a, sign_b;
  const float* bias;    /* NULL or rows floats */
  float* y;             /* n_rows x rows */
  int64_t threads;
};

/* The trh x tcw weights of one tile, as the PyTorch path computes them: z * (lambda * tile sign) * element
   sign in z's dtype (ZR: a 16-bit z rounds the scale and the product to its own dtype), then the cast into
   the activation dtype (R). zt: the slot tile's values in fp32 (tile mappers), or NULL (hashednet). */
template <int ZR, int R>
static void build_tile(const Args& A, const float* zt, int64_t local, float s, int64_t trh, int64_t tcw,
                       float* wb, int64_t ld) {
  /* ld: the row stride of wb (the tile's own width in a tile buffer, W's width when writing into W) */
  const int64_t T = A.tr * A.tc;
  const float s_z = round_to<ZR>(s);
  if (zt && !A.element_sign) {
    for (int64_t a = 0; a < trh; a++) {
      const float* za = zt + a * A.tc;
      float* wa = wb + a * ld;
      for (int64_t b = 0; b < tcw; b++) wa[b] = round_to<R>(round_to<ZR>(za[b] * s_z));
    }
    return;
  }
  for (int64_t a = 0; a < trh; a++) {
    for (int64_t b = 0; b < tcw; b++) {
      const int64_t e = a * A.tc + b;
      const int64_t v = virtual_index(local, e, A.tile_offset, T);
      const float zv = zt ? zt[e] : read_one(A.z, hashednet_slot(v, A.segment_start, A.segment_size, A.slot_a, A.slot_b));
      float sc = s_z;
      if (A.element_sign) sc *= (float)hash_sign(v, A.sign_a, A.sign_b);
      wb[a * ld + b] = round_to<R>(round_to<ZR>(zv * sc));
    }
  }
}

typedef void (*BuildFn)(const Args&, const float*, int64_t, float, int64_t, int64_t, float*, int64_t);

static BuildFn build_fn(int64_t zr, int64_t r) {
  static const BuildFn table[3][3] = {
    {build_tile<0, 0>, build_tile<0, 1>, build_tile<0, 2>},
    {build_tile<1, 0>, build_tile<1, 1>, build_tile<1, 2>},
    {build_tile<2, 0>, build_tile<2, 1>, build_tile<2, 2>},
  };
  return table[zr][r];
}

template <int TC>
static void run(const Args& A) {
  const int64_t T = A.tr * A.tc;
  const bool direct_z = A.z.bits == 0 && A.z.zkind == 0; /* fp32 z: tiles are read where they lie */
  const BuildFn build = build_fn(A.z.bits ? 0 : A.z.zkind, A.rounding);
  #pragma omp parallel for schedule(static) num_threads(A.threads)
  for (int64_t i = 0; i < A.n_tr; i++) {
    float acc_stack[MAX_ROWS * MAX_TILE * 8];
    float wbuf_stack[MAX_TILE * MAX_TILE];
    float ztile_stack[MAX_TILE * MAX_TILE];
    const int64_t r0 = i * A.tr;
    const int64_t trh = (A.rows - r0 < A.tr) ? A.rows - r0 : A.tr;
    float* acc = acc_stack;
    for (int64_t k = 0; k < A.n_rows * A.tr * 8; k++) acc[k] = 0.f;
    for (int64_t j = 0; j < A.n_tc; j++) {
      const int64_t c0 = j * A.tc;
      const int64_t tcw = (A.cols - c0 < A.tc) ? A.cols - c0 : A.tc;
      const int64_t local = i * A.n_tc + j;
      const float s = A.tile_scale[local];
      const float* zt = nullptr; /* the slot tile's T values in fp32 (tile mappers) */
      if (A.tile_slot) {
        if (direct_z) zt = (const float*)A.z.data + A.tile_slot[local] * T;
        else { read_span(A.z, A.tile_slot[local] * T, T, ztile_stack); zt = ztile_stack; }
      }
      const float* w;
      float post = s;
      if (!A.build) {
        w = zt;
      } else {
        build(A, zt, local, s, trh, tcw, wbuf_stack, A.tc);
        w = wbuf_stack;
        post = 1.f;
      }
      /* 8 partial sums per output row, kept across the whole tile row: no horizontal sum per tile,
         and the 8-wide inner loop is one vector FMA (AVX2) without reassociating anything. */
      float xs[MAX_TILE];
      const bool full = (TC > 0) && tcw == TC;
      for (int64_t n = 0; n < A.n_rows; n++) {
        const float* xr = A.x + n * A.cols + c0;
        float* an = acc + n * A.tr * 8;
        if (full) {
          for (int b = 0; b < TC; b++) xs[b] = post * xr[b];
          for (int64_t a = 0; a < trh; a++) {
            const float* wa = w + a * TC;
            float* aa = an + a * 8;
            for (int q = 0; q < TC / 8; q++)
              for (int l = 0; l < 8; l++) aa[l] += wa[q * 8 + l] * xs[q * 8 + l];
          }
        } else {
          for (int64_t b = 0; b < tcw; b++) xs[b] = post * xr[b];
          for (int64_t a = 0; a < trh; a++) {
            const float* wa = w + a * A.tc;
            float* aa = an + a * 8;
            for (int64_t b = 0; b < tcw; b++) aa[b & 7] += wa[b] * xs[b];
          }
        }
      }
    }
    for (int64_t n = 0; n < A.n_rows; n++) {
      float* yr = A.y + n * A.rows + r0;
      for (int64_t a = 0; a < trh; a++) {
        const float* aa = acc + (n * A.tr + a) * 8;
        float sum = ((aa[0] + aa[1]) + (aa[2] + aa[3])) + ((aa[4] + aa[5]) + (aa[6] + aa[7]));
        yr[a] = sum + (A.bias ? A.bias[r0 + a] : 0.f);
      }
    }
  }
}

/* W itself, rows x cols row-major fp32 (exactly the PyTorch path's materialize_weight in fp32), for calls
   with many rows: each tile goes from its span of z straight to its place in W, one pass. */
static int hf_roast_build_weight(const Args* A, float* w) {
  if (A->tr > MAX_TILE || A->tc > MAX_TILE || A->rounding != 0) return 1;
  if (A->z.bits == 0 && (A->z.zkind < 0 || A->z.zkind > 2)) return 1;
  if (A->z.bits != 0 && A->z.bits != 8 && A->z.bits != 4) return 1;
  const int64_t T = A->tr * A->tc;
  const bool direct_z = A->z.bits == 0 && A->z.zkind == 0;
  const BuildFn build = build_fn(A->z.bits ? 0 : A->z.zkind, 0);
  #pragma omp parallel for schedule(static) num_threads(A->threads)
  for (int64_t i = 0; i < A->n_tr; i++) {
    float ztile_stack[MAX_TILE * MAX_TILE];
    const int64_t r0 = i * A->tr;
    const int64_t trh = (A->rows - r0 < A->tr) ? A->rows - r0 : A->tr;
    for (int64_t j = 0; j < A->n_tc; j++) {
      const int64_t c0 = j * A->tc;
      const int64_t tcw = (A->cols - c0 < A->tc) ? A->cols - c0 : A->tc;
      const int64_t local = i * A->n_tc + j;
      const float* zt = nullptr;
      if (A->tile_slot) {
        if (direct_z) zt = (const float*)A->z.data + A->tile_slot[local] * T;
        else { read_span(A->z, A->tile_slot[local] * T, T, ztile_stack); zt = ztile_stack; }
      }
      build(*A, zt, local, A->tile_scale[local], trh, tcw, w + r0 * A->cols + c0, A->cols);
    }
  }
  return 0;
}

static int hf_roast_gemv(const Args* A) {
  if (A->tr > MAX_TILE || A->tc > MAX_TILE || A->n_rows > MAX_ROWS || A->rounding < 0 || A->rounding > 2) return 1;
  if (A->z.bits == 0 && (A->z.zkind < 0 || A->z.zkind > 2)) return 1;
  if (A->z.bits != 0 && A->z.bits != 8 && A->z.bits != 4) return 1;
  if (A->tc == 32) run<32>(*A); else if (A->tc == 16) run<16>(*A); else if (A->tc == 64) run<64>(*A); else run<0>(*A);
  return 0;
}
