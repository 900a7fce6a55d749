"""Plain per-token references: the first link of the chain of trust (token loop -> chunked PyTorch -> GPU)."""

import torch


def kda_recurrent_reference(q, k, v, g, beta, scale=None, initial_state=None):
    """KDA exactly as written in the math, one token at a time, in float64.

    q, k: [B, T, H, K] (already L2-normalised), v: [B, T, H, V], g: [B, T, H, K] log-decay, beta: [B, T, H],
    initial_state: [B, H, K, V] or None. Returns o [B, T, H, V] and the final state [B, H, K, V], float64.
        S_t = (I - beta_t k_t k_t^T) Diag(exp g_t) S_{t-1} + beta_t k_t v_t^T;   o_t = scale * S_t^T q_t
    """
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    S = torch.zeros(B, H, K, V, dtype=torch.float64) if initial_state is None else initial_state.double().clone()
    eye = torch.eye(K, dtype=torch.float64)
    o = torch.zeros(B, T, H, V, dtype=torch.float64)
    for t in range(T):
        kt, vt, bt = k[:, t], v[:, t], beta[:, t, :, None, None]  # [B, H, K], [B, H, V], [B, H, 1, 1]
        transition = (eye - bt * kt[..., :, None] * kt[..., None, :]) @ torch.diag_embed(torch.exp(g[:, t]))
        S = transition @ S + bt * kt[..., :, None] * vt[..., None, :]
        o[:, t] = scale * (S.transpose(-1, -2) @ q[:, t, ..., None]).squeeze(-1)
    return o, S
