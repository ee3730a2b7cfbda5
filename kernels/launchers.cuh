/* C-ABI launchers of the fastrlhf CUDA kernels: what the torch side (csrc/) calls.
 *
 * Plain C declarations (only the CUDA runtime header), so host C++ compiled without nvcc and
 * without torch's CUDA headers can include this. Every launcher enqueues on `stream`, never
 * synchronizes, and returns the launch status (cudaGetLastError). Tensors are raw pointers
 * plus 64-bit sizes and strides counted in elements; the caller has checked shapes, dtypes
 * and devices. Floating outputs are fp32 (float*), fp64 (double*) when the inputs are fp64.
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
  FASTRLHF_FLOAT64 = 3
} fastrlhf_dtype;

/* A floating [B, T] (or flat, row_stride unused) input read in place, unit stride along T.
 * Small ops take their inputs this way: dtypes may differ between inputs. */
typedef struct {
  const void* data;
  fastrlhf_dtype dtype;
  int64_t row_stride;
} fastrlhf_rows;

/* A mask of any dtype, unit stride along T: an element is valid where it is != 0 (for
 * floating masks -0.0 counts as 0 and NaN as valid, as in torch). */
typedef struct {
  const void* data;
  int bytes;    /* 1, 2, 4 or 8 */
  int is_float; /* compare without the sign bit */
  int64_t row_stride;
} fastrlhf_mask;

/* ------------------------------------------------------------------- build information */
/* nvcc's __CUDA_ARCH_LIST__ for the kernels, e.g. "800,900". */
const char* fastrlhf_kernels_arch_list(void);
/* CUDART_VERSION the kernels were compiled against, e.g. 13000. */
int fastrlhf_kernels_cuda_version(void);
/* cudaSuccess when the kernels have code that runs on `device`; else the error, e.g.
 * cudaErrorNoKernelImageForDevice. */
cudaError_t fastrlhf_kernels_check_device(int device);

/* ---------------------------------------------------------------------- token log-probs */
/* Row r (of n_rows) of logits [..., V] starts at (r / D1) * s0 + (r % D1) * s1; the last dim
 * has unit stride. labels: n_rows contiguous int32 (label_bytes = 4) or int64 (8).
 * Writes logp[r], stats[2r] = row max of z = logits * inv_temp, stats[2r + 1] =
 * log(sum(exp(z - max))), and entropy[r] unless entropy is NULL. Label == ignore_index: logp 0,
 * entropy 0. Label outside [0, V): logp NaN. logp is clamped to <= 0, entropy to >= 0;
 * NaN stays NaN. */
cudaError_t fastrlhf_token_logprobs_fwd(
    fastrlhf_dtype dtype, const void* logits, int64_t n_rows, int64_t D1, int64_t s0, int64_t s1,
    int64_t V, const void* labels, int label_bytes, double inv_temp, int64_t ignore_index,
    void* logp, void* entropy, void* stats, cudaStream_t stream);

/* grad_logits (same dtype as logits; row r at (r / D1) * d0 + (r % D1) * d1; may be logits
 * itself) = (g_logp * (onehot(label) - p) - g_ent * p * (log p + H)) * inv_temp, with
 * log p = z - stats[2r] - stats[2r + 1]; onehot is 0 for a label outside [0, V), and rows
 * whose label is ignore_index get no g_logp or g_ent. grad_logp, entropy: n_rows contiguous
 * accumulation type values; grad_entropy may be NULL (no entropy term). */
cudaError_t fastrlhf_token_logprobs_bwd(
    fastrlhf_dtype dtype, const void* logits, int64_t n_rows, int64_t D1, int64_t s0, int64_t s1,
    int64_t V, void* grad_logits, int64_t d0, int64_t d1, const void* labels, int label_bytes,
    const void* stats, const void* entropy, const void* grad_logp, const void* grad_entropy,
    double inv_temp, int64_t ignore_index, cudaStream_t stream);

/* ------------------------------------------------------------------------- advantages */
/* GAE over [B, T] (values NULL: discounted returns, values = 0) as a reverse scan of affine
 * step maps. A valid step (mask != 0): A = gamma_lam * A_next + gamma * V_next + r - V,
 * V_next = V. A masked step: skipped when skip_holes (state carries across), else a step with
 * r = V = 0. Rows are cut into chunks of `chunk` positions (chunk >= T: whole rows), one block
 * of `threads` (a power of two in [32, 512]; a tile is 4 * threads positions) per chunk. With
 * several chunks a first launch writes each chunk's composite map into `maps` (scratch of
 * 5 * B * ceil(T / chunk) accumulation-type values), and the scan starts each chunk from the
 * maps of the later chunks of its row. Outputs [B, T] contiguous in the accumulation type
 * (double when acc_double), 0 where masked; returns = A + V, or NULL. An invalid threads,
 * chunk, or a missing maps gives cudaErrorInvalidValue. */
cudaError_t fastrlhf_gae_fwd(int64_t B, int64_t T, fastrlhf_rows rewards, fastrlhf_rows values,
                             fastrlhf_mask mask, double gamma, double gamma_lam, int skip_holes,
                             int acc_double, int threads, int64_t chunk, void* maps,
                             void* advantages, void* returns, cudaStream_t stream);

/* Advantages of scores [n_groups * group_size] within consecutive groups. method: 0 grpo
 * (s - mean) / (unbiased std + eps), 1 rloo (s - mean of the others), 2 dr_grpo (s - mean);
 * a group of one: mean 0, std 1. out: contiguous, accumulation type. */
cudaError_t fastrlhf_group_advantages_fwd(fastrlhf_rows scores, int64_t n_groups,
                                          int64_t group_size, int method, double eps,
                                          int acc_double, void* out, cudaStream_t stream);

/* ---------------------------------------------------------------------------------- kl */
/* estimator: 0 k1 (x), 1 abs (|x|), 2 k2 (x^2 / 2), 3 k3 (exp(-x) - 1 + x) of x = the log-ratio
 * logprobs - ref_logprobs clamped to +-log_ratio_clamp; the estimate is clamped to +-clamp
 * (inf: no clamp). Inputs flat, contiguous, n elements; out in the accumulation type. */
cudaError_t fastrlhf_kl_penalty_fwd(int64_t n, fastrlhf_rows logprobs, fastrlhf_rows ref_logprobs,
                                    int estimator, double clamp, double log_ratio_clamp,
                                    int acc_double, void* out, cudaStream_t stream);

/* d = grad * d estimate / d log-ratio (0 where a clamp is active; straight-through: the
 * log-ratio itself); grad_logprobs = d, grad_ref_logprobs = -d, each in its input's dtype and
 * skipped when NULL. */
cudaError_t fastrlhf_kl_penalty_bwd(int64_t n, fastrlhf_rows grad, fastrlhf_rows logprobs,
                                    fastrlhf_rows ref_logprobs, int estimator, int straight,
                                    double clamp, double log_ratio_clamp, int acc_double,
                                    void* grad_logprobs, void* grad_ref_logprobs,
                                    cudaStream_t stream);

/* rewards = -coef * kl on valid tokens, 0 elsewhere, plus the score (clamped to +-score_clip)
 * at each row's last valid token; kl is 0 outside the mask. coef is *kl_coef_t when its data
 * is not NULL, else kl_coef. scores: [B] contiguous. Outputs [B, T] contiguous. */
cudaError_t fastrlhf_kl_rewards_fwd(int64_t B, int64_t T, fastrlhf_rows scores,
                                    fastrlhf_rows logprobs, fastrlhf_rows ref_logprobs,
                                    fastrlhf_mask mask, double kl_coef, fastrlhf_rows kl_coef_t,
                                    int estimator, double kl_clamp, double log_ratio_clamp,
                                    double score_clip, int acc_double, void* rewards, void* kl,
                                    cudaStream_t stream);

/* --------------------------------------------------------------------------------- ppo */
/* The tokens of a PPO loss: n = B * T flat, contiguous tokens of x (log-probs or values, the
 * input with a gradient), old (its old values) and target (advantages or returns), and the
 * mask. row_counts (int64 [B], NULL unless seq-mean-token-mean) divides each token's loss by
 * its row's count of valid tokens. */
typedef struct {
  fastrlhf_rows x, old, target;
  fastrlhf_mask mask;
  int64_t n, T;
  const int64_t* row_counts;
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
 * counts[p] = valid, counts[n_parts + p] = clipped. */
cudaError_t fastrlhf_ppo_policy_fwd(fastrlhf_ppo_tokens tokens, fastrlhf_policy_clip clip, int acc_double,
                                    int64_t n_parts, void* sums, int32_t* counts, cudaStream_t stream);
cudaError_t fastrlhf_ppo_value_fwd(fastrlhf_ppo_tokens tokens, double clip, int acc_double, int64_t n_parts,
                                   void* sums, int32_t* counts, cudaStream_t stream);

/* Backward: grad_x (x's dtype) = grad * scale * d loss_token / dx (/ row count) on valid
 * tokens, 0 elsewhere; grad and scale are 0-dim device values. */
cudaError_t fastrlhf_ppo_policy_bwd(fastrlhf_ppo_tokens tokens, fastrlhf_policy_clip clip, fastrlhf_rows grad,
                                    fastrlhf_rows scale, int acc_double, void* grad_logprobs,
                                    cudaStream_t stream);
cudaError_t fastrlhf_ppo_value_bwd(fastrlhf_ppo_tokens tokens, double clip, fastrlhf_rows grad,
                                   fastrlhf_rows scale, int acc_double, void* grad_values, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* FASTRLHF_LAUNCHERS_CUH */
