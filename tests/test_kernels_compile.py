"""The Triton kernels compile for an H100 (sm_90) on a machine without a GPU: triton's front end, its
MLIR passes and the ptxas it ships run on the CPU, so a kernel change that would only fail on a GPU (a
dtype a builtin refuses, a global that is not a constexpr, ...) fails here. Each kernel at the launch
configurations the wrappers pick on a GPU (kernels/_triton.py: sim_tiles, select_tiles, loss_tiles ...)."""
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lvmae_fast.kernels import _adamw as KA
    from lvmae_fast.kernels import _triton as KT

    def compile_for_sm90(kernel, signature, constexprs):
        sig = {name: ("constexpr" if name in constexprs else kind) for name, kind in signature.items()}
        compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], kernel
        return compiled

    built = []
    for dtype in ("fp32", "bf16"):
        for D in (1024, 100):
            sim = {"x_ptr": f"*{dtype}", "key_ptr": "*i32", "T": "i32", "D": "i32", "stride_x": "i32"}
            block_t, block_d = KT.sim_tiles(D, 256 * 256, True)
            for inverted in (False, True):
                compile_for_sm90(KT.adjacent_key_kernel, {**sim, "INVERTED": 0, "EPS": 0, "BLOCK_T": 0, "BLOCK_D": 0},
                                 {"INVERTED": inverted, "EPS": KT.COSINE_EPS, "BLOCK_T": block_t, "BLOCK_D": block_d})
                compile_for_sm90(KT.adjacent_key_stream_kernel, {**sim, "INVERTED": 0, "EPS": 0, "ROWS": 0, "BLOCK_D": 0},
                                 {"INVERTED": inverted, "EPS": KT.COSINE_EPS, "ROWS": KT.STREAM_ROWS,
                                  "BLOCK_D": triton.next_power_of_2(D)})
            built.append(f"similarity {dtype} d={D}")
            loss = {"pred_ptr": f"*{dtype}", "tgt_ptr": f"*{dtype}", "rows_ptr": "*i64", "mask_ptr": "*i1"}
            block_m, block_d = KT.loss_tiles(D, True)
            for cosine in (False, True):
                flags = {"HAS_ROWS": True, "HAS_MASK": False, "COSINE": cosine, "EPS": KT.LOSS_COSINE_EPS,
                         "BLOCK_M": block_m, "BLOCK_D": block_d}
                compile_for_sm90(KT.loss_fwd_kernel, {**loss, "part_ptr": "*fp32", "N": "i32", "D": "i32",
                                 "stride_p": "i32", "stride_t": "i32", **dict.fromkeys(flags, 0)}, flags)
                compile_for_sm90(KT.loss_bwd_kernel, {**loss, "scale_ptr": "*fp32", "grad_ptr": f"*{dtype}", "N": "i32",
                                 "D": "i32", "stride_p": "i32", "stride_t": "i32", "stride_g": "i32",
                                 **dict.fromkeys(flags, 0)}, flags)
            built.append(f"loss {dtype} d={D}")
    select = {"key_ptr": "*i32", "cu_ptr": "*i32", "k_ptr": "*i32", "out_ptr": "*u8", "B": "i32",
              "VIDS": 0, "BLOCK": 0, "RADIX_BITS": 0}
    for max_seqlen in (256, 8192):
        vids, block, bits = KT.select_tiles(max_seqlen, 256, True)
        compile_for_sm90(KT.select_lowest_kernel, select, {"VIDS": vids, "BLOCK": block, "RADIX_BITS": bits})
        vids, block, bits, _ = KT.select_hist_tiles(max_seqlen, 256, True)
        compile_for_sm90(KT.select_hist_kernel, select, {"VIDS": vids, "BLOCK": block, "RADIX_BITS": bits})
        built.append(f"selection L={max_seqlen}")
    adamw = {"grad_ptr": "*bf16", "master_ptr": "*fp32", "m_ptr": "*fp32", "v_ptr": "*fp32", "low_ptr": "*bf16",
             "n": "i64", "lr_ptr": "*fp32", "step_size_ptr": "*fp32", "bc2_sqrt_ptr": "*fp32", "scale_ptr": "*fp32",
             "skip_ptr": "*fp32", "one_minus_beta1": "fp32", "beta2": "fp32", "one_minus_beta2": "fp32", "eps": "fp32",
             "weight_decay": "fp32", "HAS_LOW": 0, "BLOCK": 0}
    compile_for_sm90(KA.master_adamw_kernel, adamw, {"HAS_LOW": True, "BLOCK": KA.BLOCK})
    built.append("master AdamW")
    print("compiled:", "; ".join(built))
""")


def test_every_triton_kernel_compiles_for_sm90_without_a_gpu(tmp_path):
    env_free = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env_free["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile, not a cached result
    env_free.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated (it warns otherwise)
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, env=env_free)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "master AdamW" in r.stdout, r.stdout
