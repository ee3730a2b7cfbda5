/* C-ABI launchers of the fastrlhf CUDA kernels: what the torch side (csrc/) calls.
 *
 * Plain C declarations (only the CUDA runtime header), so host C++ compiled without nvcc and
 * without torch's CUDA headers can include this. Every launcher enqueues on `stream`, never
 * synchronizes, and returns the launch status (cudaGetLastError; cudaErrorInvalidValue for
 * arguments it cannot run). The caller has checked shapes, dtypes and devices.
 *
 * Conventions: every typed pointer says its type with one enum, fastrlhf_dtype; sizes and
 * strides are 64-bit and counted in elements; the arguments of an op family travel in one
 * struct, filled once on the torch side and passed by const pointer (read before the launcher
 * returns). Math happens in the accumulation dtype `acc` (FASTRLHF_FLOAT64 when an input is
 * fp64, else FASTRLHF_FLOAT32), which is also the dtype of the floating outputs.
 */
#ifndef FASTRLHF_LAUNCHERS_CUH
#define FASTRLHF_LAUNCHERS_CUH

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  FASTRLHF_FLOAT32 = 0,
  FASTRLHF_FLOAT16 = 1,
  FASTRLHF_BFLOAT16 = 2,
  FASTRLHF_FLOAT64 = 3,
  FASTRLHF_BOOL = 4,
  FASTRLHF_UINT8 = 5,
  FASTRLHF_INT8 = 6,
  FASTRLHF_INT16 = 7,
  FASTRLHF_INT32 = 8,
  FASTRLHF_INT64 = 9
} fastrlhf_dtype;

/* A [B, T] input read in place with unit stride along T (row r at r * row_stride), or a flat
 * contiguous one (row_stride unused). Floating inputs may have any floating dtype, each its
 * own; a mask may have any dtype and is valid where != 0 (for floating masks -0.0 counts as
 * 0 and NaN as valid, as in torch). data NULL: the input is absent. */
typedef struct {
  const void* data;
  fastrlhf_dtype dtype;
  int64_t row_stride;
} fastrlhf_rows;

/* ------------------------------------------------------------------- build information */
/* nvcc's __CUDA_ARCH_LIST__ for the kernels, e.g. "800,900". */
const char* fastrlhf_kernels_arch_list(void);
/* CUDART_VERSION the kernels were compiled against, e.g. 13000. */
int fastrlhf_kernels_cuda_version(void);
/* cudaSuccess when the kernels have code that runs on `device`; else the error, e.g.
 * cudaErrorNoKernelImageForDevice. */
cudaError_t fastrlhf_kernels_check_device(int device);

/* ---------------------------------------------------------------------- token log-probs */
/* Logits [..., V] (V < 2^31) and their labels. Row r (of n_rows) of the logits starts at
 * (r / D1) * s0 + (r % D1) * s1 elements; the last dim has unit stride. */
typedef struct {
  fastrlhf_dtype dtype; /* of the logits (and of grad_logits): a floating dtype */
  const void* logits;
  int64_t n_rows, V, D1, s0, s1;
  const void* labels;
  fastrlhf_dtype label_dtype; /* FASTRLHF_INT32 or FASTRLHF_INT64; n_rows contiguous */
  double inv_temp;            /* 1 / temperature */
  int64_t ignore_index;
} fastrlhf_logits;

/* Forward outputs, n_rows contiguous values each in the accumulation dtype: logp[r],
 * entropy[r] (NULL: not computed), stats[2r] = row max of z = logits * inv_temp,
 * stats[2r + 1] = log(sum(exp(z - max))). Label == ignore_index: logp 0, entropy 0. Label
 * outside [0, V): logp NaN. logp is clamped to <= 0, entropy to >= 0; NaN stays NaN. */
typedef struct {
  fastrlhf_logits in;
  void* logp;
  void* entropy;
  void* stats;
} fastrlhf_logprobs_fwd_params;

/* grad_logits (the logits' dtype; row r at (r / D1) * d0 + (r % D1) * d1; may be the logits
 * themselves) = (g_logp * (onehot(label) - p) - g_ent * p * (log p + H)) * inv_temp, with
 * log p = z - stats[2r] - stats[2r + 1]; onehot is 0 for a label outside [0, V), and rows
 * whose label is ignore_index get no g_logp or g_ent. stats, entropy, grad_logp,
 * grad_entropy: n_rows contiguous accumulation-dtype values; grad_entropy NULL: no entropy
 * term (entropy unread). */
typedef struct {
  fastrlhf_logits in;
  void* grad_logits;
  int64_t d0, d1;
  const void* stats;
  const void* entropy;
  const void* grad_logp;
  const void* grad_entropy;
} fastrlhf_logprobs_bwd_params;

cudaError_t fastrlhf_token_logprobs_fwd(const fastrlhf_logprobs_fwd_params* params, cudaStream_t stream);
cudaError_t fastrlhf_token_logprobs_bwd(const fastrlhf_logprobs_bwd_params* params, cudaStream_t stream);

/* ------------------------------------------------------------------------- advantages */
/* GAE over [B, T] (values absent: discounted returns, values = 0) as a reverse scan of affine
 * step maps. A valid step (mask != 0): A = gamma_lam * A_next + gamma * V_next + r - V,
 * V_next = V. A masked step: skipped when skip_holes (state carries across), else a step with
 * r = V = 0. Rows are cut into chunks of `chunk` positions (chunk >= T: whole rows), one block
 * of `threads` (a power of two in [32, 512]) per chunk, scanning tiles of a fixed number of
 * positions per thread (fastrlhf.cuda.advantages.ITEMS); chunk is a multiple of the tile when
 * rows have several chunks. With several chunks a first launch writes each chunk's composite
 * map into `maps` (scratch of 5 * B * ceil(T / chunk) accumulation-dtype values), and the scan
 * starts each chunk from the maps of the later chunks of its row. Outputs [B, T] contiguous in
 * the accumulation dtype, 0 where masked; returns = A + V, or NULL. An invalid threads or
 * chunk, or missing maps, gives cudaErrorInvalidValue. */
typedef struct {
  int64_t B, T;
  fastrlhf_rows rewards, values, mask;
  double gamma, gamma_lam;
  int skip_holes;
  fastrlhf_dtype acc;
  void* advantages;
  void* returns;
  int threads;
  int64_t chunk;
  void* maps;
} fastrlhf_gae_params;

cudaError_t fastrlhf_gae_fwd(const fastrlhf_gae_params* params, cudaStream_t stream);

/* Group advantage methods, numbered as fastrlhf.reference.advantages.METHODS (a test checks). */
enum fastrlhf_group_method { FASTRLHF_GRPO = 0, FASTRLHF_RLOO = 1, FASTRLHF_DR_GRPO = 2 };

/* Advantages of scores [n_groups * group_size] within consecutive groups. method: grpo
 * (s - mean) / (unbiased std + eps), rloo (s - mean of the others), dr_grpo (s - mean);
 * a group of one: mean 0, std 1. out: contiguous, in `acc`. */
cudaError_t fastrlhf_group_advantages_fwd(fastrlhf_rows scores, int64_t n_groups, int64_t group_size,
                                          int method, double eps, fastrlhf_dtype acc, void* out,
                                          cudaStream_t stream);

/* ---------------------------------------------------------------------------------- kl */
/* KL estimators, numbered as fastrlhf.reference.kl.CODES (a test checks). */
enum fastrlhf_kl_code { FASTRLHF_K1 = 0, FASTRLHF_ABS = 1, FASTRLHF_K2 = 2, FASTRLHF_K3 = 3 };

/* The estimate of x, the log-ratio logprobs - ref_logprobs clamped to +-log_ratio_clamp:
 * estimator k1 (x), abs (|x|), k2 (x^2 / 2), k3 (exp(-x) - 1 + x, kl_math.cuh), then clamped to
 * +-clamp. inf: no clamp. */
typedef struct {
  int estimator;
  double clamp;
  double log_ratio_clamp;
} fastrlhf_kl_estimator;

/* n flat, contiguous tokens of the two log-probs, and the math's dtype. */
typedef struct {
  int64_t n;
  fastrlhf_rows logprobs, ref_logprobs;
  fastrlhf_kl_estimator est;
  fastrlhf_dtype acc;
} fastrlhf_kl_tokens;

/* out: n values of the estimate in `acc`. */
cudaError_t fastrlhf_kl_penalty_fwd(const fastrlhf_kl_tokens* tokens, void* out, cudaStream_t stream);

/* d = grad * d estimate / d log-ratio (0 where a clamp is active; straight-through: the
 * log-ratio itself); grad_logprobs = d, grad_ref_logprobs = -d, each in its input's dtype and
 * skipped when NULL. grad: n flat tokens. */
cudaError_t fastrlhf_kl_penalty_bwd(const fastrlhf_kl_tokens* tokens, fastrlhf_rows grad, int straight,
                                    void* grad_logprobs, void* grad_ref_logprobs, cudaStream_t stream);

/* rewards = -coef * kl on valid tokens, 0 elsewhere, plus the score (clamped to +-score_clip)
 * at each row's last valid token; kl is 0 outside the mask. coef is *kl_coef_t when its data
 * is not NULL, else kl_coef. scores: [B] contiguous. Outputs [B, T] contiguous in `acc`. */
typedef struct {
  int64_t B, T;
  fastrlhf_rows scores, logprobs, ref_logprobs, mask;
  double kl_coef;
  fastrlhf_rows kl_coef_t;
  fastrlhf_kl_estimator est;
  double score_clip;
  fastrlhf_dtype acc;
  void* rewards;
  void* kl;
} fastrlhf_kl_rewards_params;

cudaError_t fastrlhf_kl_rewards_fwd(const fastrlhf_kl_rewards_params* params, cudaStream_t stream);

/* --------------------------------------------------------------------------------- ppo */
/* The tokens of a PPO loss: n = B * T flat, contiguous tokens of x (log-probs or values, the
 * input with a gradient), old (its old values) and target (advantages or returns), and the
 * mask. row_counts (int64 [B], NULL unless seq-mean-token-mean) divides each token's loss by
 * its row's count of valid tokens. */
typedef struct {
  fastrlhf_rows x, old, target, mask;
  int64_t n, T;
  const int64_t* row_counts;
  fastrlhf_dtype acc;
} fastrlhf_ppo_tokens;

/* The policy loss's clip arguments; inf where an option is off. */
typedef struct {
  double ratio_low;       /* 1 - clip_low */
  double ratio_high;      /* 1 + clip_high */
  double dual_clip;       /* caps the loss at -advantage * dual_clip where advantage < 0 */
  double log_ratio_clamp; /* the log-ratio is clamped to +-log_ratio_clamp before exp */
} fastrlhf_policy_clip;

/* Forward: block p of n_parts sums its share of the tokens. Policy: sums[p] = loss,
 * sums[n_parts + p] = -log-ratio, counts[p] = valid, counts[n_parts + p] = clipped,
 * counts[2 * n_parts + p] = dual-clipped. Value (clip around the old value): sums[p] = loss,
 * counts[p] = valid, counts[n_parts + p] = clipped. sums in `acc`. */
cudaError_t fastrlhf_ppo_policy_fwd(const fastrlhf_ppo_tokens* tokens, const fastrlhf_policy_clip* clip,
                                    int64_t n_parts, void* sums, int32_t* counts, cudaStream_t stream);
cudaError_t fastrlhf_ppo_value_fwd(const fastrlhf_ppo_tokens* tokens, double clip, int64_t n_parts,
                                   void* sums, int32_t* counts, cudaStream_t stream);

/* Backward: grad_x (x's dtype) = grad * scale * d loss_token / dx (/ row count) on valid
 * tokens, 0 elsewhere; grad and scale are 0-dim device values. */
cudaError_t fastrlhf_ppo_policy_bwd(const fastrlhf_ppo_tokens* tokens, const fastrlhf_policy_clip* clip,
                                    fastrlhf_rows grad, fastrlhf_rows scale, void* grad_x,
                                    cudaStream_t stream);
cudaError_t fastrlhf_ppo_value_bwd(const fastrlhf_ppo_tokens* tokens, double clip, fastrlhf_rows grad,
                                   fastrlhf_rows scale, void* grad_x, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* FASTRLHF_LAUNCHERS_CUH */
