"""Layout of the per-token statistics the row and fused kernels fold into.

Kept free of any triton import so the pure-PyTorch fallback shares it.
``stats[k, token]`` is float32; the callers turn the rows into log-probs and metrics.
"""

STAT_MAX = 0  # running max of z (also the value of the argmax)
STAT_SUMEXP = 1  # sum exp(z - max)
STAT_ZEXP = 2  # sum z * exp(z - max): entropy = lse - ZEXP / SUMEXP
STAT_SQEXP = 3  # sum exp(2 (z - max)): log sum p^2 = log SQEXP - 2 log SUMEXP
STAT_ZSUM = 4  # sum z: vocab-mean logit = ZSUM / V
STAT_ARGMAX = 5  # first index of the max (float32 is exact below 2^24)
STAT_TARGET = 6  # z at the label
NUM_STATS = 7
