"""The kernels' ranking, selection and sizing rules (csrc/rules.h), compiled for the host and run on
a CPU against torch: NaN and ±Inf scores, an all-NaN row, empty batches, the tensor-core choice; and
the load-time self-check's cases (tomesd.ops.selfcheck) against the same rules: they must reach the paths
real workloads take (several dst tiles per block, unvectorized loads, pack width 1, block-scan chunks).

rules.h is the code the kernels call (`better`, `orderable`, `select_key`, `split_count`,
`tensor_cores_usable`, and `one_dst_per_cell`, the local ops' check under TOMESD_CHECK_INDICES=1); a
small C harness loads it with ctypes. `fold_row` replays the matching
kernels' reduction order on the host: each lane folds its columns of every dst tile of its slice,
the lanes of a row combine by xor shuffles, then combine_splits folds the slices in order.
Skipped only where no C++ compiler is installed.
"""
from __future__ import annotations

import ctypes
import math
import random
import re
import shutil
import struct
import subprocess

import pytest
import torch

from tomesd import matching
from tomesd.ops import loader, selfcheck
from tomesd.ops.torch_ops import check_window

HARNESS = r"""
#include "rules.h"
#include <vector>

using namespace tomesd;

extern "C" {
int no_dst() { return kNoDst; }
int better_c(float v, int i, float bv, int bi) { return better(v, i, bv, bi); }
uint32_t orderable_c(float f) { return orderable(f); }
uint64_t select_key_c(float f, int s) { return select_key(f, s); }
int split_count_c(int64_t blocks, int dtiles, int64_t want) { return split_count(blocks, dtiles, want); }
int tensor_cores_usable_c(int half, int major, int ptx, int binary) {
  return tensor_cores_usable(half != 0, major, ptx, binary);
}
int geometry_c(int i) {
  const int values[] = {kSimtS, kSimtD, kTcS, kTcD, kPlanThreads};
  return values[i];
}
int tiles_per_split_c(int dtiles, int splits) { return tiles_per_split(dtiles, splits); }
int vector_loads_c(int C, uint64_t address) { return vector_loads(C, address); }
int pack_width_c(int C, int elem_bytes, uint64_t p0, uint64_t p1) { return pack_width(C, elem_bytes, p0, p1); }
int one_dst_per_cell_c(const int64_t* dst, int64_t D, int64_t h, int64_t w, int64_t sx, int64_t sy) {
  std::vector<unsigned char> seen(static_cast<size_t>((h / sy) * (w / sx) > 0 ? (h / sy) * (w / sx) : 0));
  return one_dst_per_cell(dst, D, h, w, sx, sy, seen.data());
}

// One src row's (max, argmax) over scores v[0..D) as the kernels reduce it: `tile` dst per tile,
// `lanes` lanes per row each owning `tile / lanes` consecutive columns of a tile, `splits` slices
// of whole tiles (per = ceil(tiles / splits) tiles each), xor shuffles, then the slices in order.
// The running best starts as (-FLT_MAX, kNoDst), as in the kernels.
void fold_row(const float* v, int D, int tile, int lanes, int splits, float* out_v, int* out_i) {
  const int tiles = (D + tile - 1) / tile, per = (tiles + splits - 1) / splits, cols = tile / lanes;
  float bv = -3.4028235e38f;
  int bi = kNoDst;
  for (int split = 0; split < splits; ++split) {
    std::vector<float> lv(lanes, -3.4028235e38f);
    std::vector<int> li(lanes, kNoDst);
    const int t1 = (split + 1) * per < tiles ? (split + 1) * per : tiles;
    for (int t = split * per; t < t1; ++t)
      for (int l = 0; l < lanes; ++l)
        for (int c = 0; c < cols; ++c) {
          const int d = t * tile + l * cols + c;
          if (d < D && better(v[d], d, lv[l], li[l])) {
            lv[l] = v[d];
            li[l] = d;
          }
        }
    for (int o = lanes / 2; o > 0; o /= 2) {  // __shfl_xor_sync: every lane reads before any writes
      std::vector<float> pv(lv);
      std::vector<int> pi(li);
      for (int l = 0; l < lanes; ++l)
        if (better(pv[l ^ o], pi[l ^ o], lv[l], li[l])) {
          lv[l] = pv[l ^ o];
          li[l] = pi[l ^ o];
        }
    }
    if (better(lv[0], li[0], bv, bi)) {  // combine_splits
      bv = lv[0];
      bi = li[0];
    }
  }
  *out_v = bv;
  *out_i = bi;
}
}
"""

# (tile, lanes): the CUDA-core kernel (64 dst, 16 lanes of 4 columns) and the tensor-core one
# (64 dst, 2 threads of 32 columns).
KERNELS = {"simt": (64, 16), "wmma": (64, 2)}
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def rules(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler: cannot compile csrc/rules.h for the host")
    out = tmp_path_factory.mktemp("rules")
    src = out / "harness.cpp"
    src.write_text(HARNESS)
    lib = out / "librules.so"
    proc = subprocess.run([cxx, "-std=c++17", "-O2", "-shared", "-fPIC", "-Wall", "-Werror",
                           f"-I{loader.csrc_dir()}", str(src), "-o", str(lib)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    dll = ctypes.CDLL(str(lib))
    f, i32, u32, u64, i64 = ctypes.c_float, ctypes.c_int, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int64
    for name, res, args in (
        ("no_dst", i32, []), ("better_c", i32, [f, i32, f, i32]), ("orderable_c", u32, [f]),
        ("select_key_c", u64, [f, i32]), ("split_count_c", i32, [i64, i32, i64]),
        ("tensor_cores_usable_c", i32, [i32, i32, i32, i32]), ("geometry_c", i32, [i32]),
        ("tiles_per_split_c", i32, [i32, i32]), ("vector_loads_c", i32, [i32, u64]),
        ("pack_width_c", i32, [i32, i32, u64, u64]),
        ("one_dst_per_cell_c", i32, [ctypes.POINTER(i64), i64, i64, i64, i64, i64]),
        ("fold_row", None, [ctypes.POINTER(f), i32, i32, i32, i32, ctypes.POINTER(f), ctypes.POINTER(i32)]),
    ):
        getattr(dll, name).restype = res
        getattr(dll, name).argtypes = args
    return dll


def _fold(rules, row, kernel, splits):
    tile, lanes = KERNELS[kernel]
    arr = (ctypes.c_float * len(row))(*row)
    v, i = ctypes.c_float(), ctypes.c_int()
    rules.fold_row(arr, len(row), tile, lanes, splits, ctypes.byref(v), ctypes.byref(i))
    return v.value, i.value


def _neg_nan() -> float:
    return struct.unpack("<f", struct.pack("<I", 0xFFC00001))[0]


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _rows(seed=0):
    """Score rows with NaN (both signs), ±Inf, exact ties and all-NaN / all -Inf rows."""
    rnd = random.Random(seed)
    rows = [[NAN] * 70, [_neg_nan()] * 3, [-INF] * 130, [0.25] * 65, [-1.0, NAN, 0.5, NAN], [_neg_nan(), 1.0, NAN]]
    for _ in range(40):
        D = rnd.choice([1, 5, 63, 64, 65, 130, 300])
        row = [rnd.choice([0.1, 0.2, 0.3]) if rnd.random() < 0.3 else rnd.uniform(-1, 1) for _ in range(D)]
        for _ in range(rnd.randint(0, 3)):
            row[rnd.randrange(D)] = rnd.choice([NAN, _neg_nan(), INF, -INF])
        rows.append(row)
    return rows


def _torch_best(row):
    """torch.max's (value, index) of a row (on a CPU: the first NaN, else the first maximum)."""
    value, index = torch.tensor(row, dtype=torch.float32).max(dim=0)
    return value.item(), index.item()


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("splits", [1, 2, 3])
def test_kernel_reduction_matches_torch_max_with_nan_and_inf(rules, kernel, splits):
    for row in _rows(seed=splits):
        tiles = -(-len(row) // KERNELS[kernel][0])
        splits_here = min(splits, tiles)  # match_splits never makes a slice without a tile
        value, index = _fold(rules, row, kernel, splits_here)
        ref_value, ref_index = _torch_best(row)
        assert 0 <= index < len(row), f"dst position {index} of a {len(row)}-dst row (an all-NaN row?)"
        assert index == ref_index, (row, index, ref_index)
        assert (math.isnan(value) and math.isnan(ref_value)) or value == ref_value


def test_better_is_a_strict_order_with_nan_on_top(rules):
    assert not rules.better_c(0.5, rules.no_dst(), 0.1, 3)  # nothing never wins
    assert rules.better_c(-INF, 7, -3.4e38, rules.no_dst())  # anything beats nothing
    assert rules.better_c(NAN, 9, INF, 0) and not rules.better_c(INF, 0, NAN, 9)
    assert rules.better_c(NAN, 2, _neg_nan(), 4) and not rules.better_c(NAN, 4, _neg_nan(), 2)
    assert rules.better_c(0.5, 1, 0.5, 2) and not rules.better_c(0.5, 2, 0.5, 1)
    values = [NAN, _neg_nan(), INF, -INF, 0.0, -0.0, 1.0, 1.0]
    for a, ia in zip(values, range(8)):
        for b, ib in zip(values, range(8)):
            if ia != ib:
                assert rules.better_c(a, ia, b, ib) != rules.better_c(b, ib, a, ia), (a, ia, b, ib)


def test_select_keys_rank_as_torch_topk(rules):
    """orderable: the order of the floats, every NaN above +Inf, so the plan kernel's radix select
    picks NaN-scored src first, as torch.topk does; keys are unique, ties to the lower position."""
    rnd = random.Random(0)
    values = [NAN, _neg_nan(), INF, -INF, 0.0, 1e-40, -1e-40, 3.4e38, -3.4e38] + [rnd.uniform(-2, 2) for _ in range(200)]
    for a in values:
        for b in values[:40]:
            ka, kb = rules.orderable_c(a), rules.orderable_c(b)
            if math.isnan(a) or math.isnan(b):
                assert (ka == kb) == (math.isnan(a) and math.isnan(b))
                assert (ka > kb) == (math.isnan(a) and not math.isnan(b))
            elif _f32(a) != _f32(b):
                assert (ka > kb) == (_f32(a) > _f32(b)), (a, b)
    score = torch.tensor([0.3, NAN, 0.9, _neg_nan(), -INF, 0.5, INF, 0.1])
    for r in range(1, len(score) + 1):
        keys = [rules.select_key_c(float(s), i) for i, s in enumerate(score.tolist())]
        chosen = sorted(sorted(range(len(keys)), key=lambda i: -keys[i])[:r])
        assert chosen == sorted(score.topk(r).indices.tolist()), r
    assert rules.select_key_c(0.5, 1) > rules.select_key_c(0.5, 2)


def test_split_count_for_empty_and_small_problems(rules):
    assert rules.split_count_c(0, 10, 264) == 1  # B = 0 or S = 0: no division by zero
    assert rules.split_count_c(-1, 10, 264) == 1
    assert rules.split_count_c(1000, 10, 264) == 1 and rules.split_count_c(3, 1, 264) == 1
    for blocks in range(1, 40):
        for dtiles in range(1, 70):
            splits = rules.split_count_c(blocks, dtiles, 264)
            per = -(-dtiles // splits)
            assert 1 <= splits <= dtiles and (splits - 1) * per < dtiles  # every slice has a tile


def test_tensor_cores_only_with_sm80_code(rules):
    assert rules.tensor_cores_usable_c(1, 9, 90, 90) and rules.tensor_cores_usable_c(1, 8, 80, 86)
    assert not rules.tensor_cores_usable_c(0, 9, 90, 90)  # fp32: CUDA-core tile
    assert not rules.tensor_cores_usable_c(1, 7, 75, 75)  # Turing
    assert not rules.tensor_cores_usable_c(1, 8, 75, 80)  # compute_75 PTX JIT-compiled on an A100: empty body
    assert not rules.tensor_cores_usable_c(1, 9, 0, 0)  # no image for this device


def test_python_twin_of_orderable_is_the_compiled_one(rules):
    """tests/test_ops_cpu.py emulates the plan kernel's radix select in Python with a twin of
    orderable; it must rank exactly as the compiled rule does."""
    from test_ops_cpu import _orderable

    rnd = random.Random(1)
    bits = [0x7FC00000, 0xFFC00001, 0x7F800001, 0x7F800000, 0xFF800000, 0, 0x80000000, 1, 0x80000001]
    bits += [rnd.getrandbits(32) for _ in range(2000)]
    for b in bits:
        f = struct.unpack("<f", struct.pack("<I", b))[0]
        assert rules.orderable_c(f) == _orderable(f), hex(b)


# ---- The self-check's cases against the kernels' geometry ----

SM_COUNTS = (108, 132, 148)  # A100, H100 / H200, B200: the check must reach the paths on each
BASE = 1 << 20  # a 16-byte aligned device address; "offset" layouts add one element


def _geometry(rules):
    simt_s, simt_d, tc_s, tc_d, plan_threads = (rules.geometry_c(i) for i in range(5))
    return dict(simt=(simt_s, simt_d), wmma=(tc_s, tc_d), plan_threads=plan_threads)


def _properties(rules, case, sms):
    """What one self-check case reaches on a GPU with `sms` SMs, by the rules the launchers use."""
    dst, src = matching.partition(case.h, case.w, case.sx, case.sy, None, "cpu")
    N, S, D = case.h * case.w, len(src), len(dst)
    r = selfcheck.case_r(case, S)
    elem = torch.finfo(getattr(torch, case.dtype)).bits // 8
    half = elem == 2
    tile_s, tile_d = _geometry(rules)["wmma" if half else "simt"]
    dtiles = -(-D // tile_d)
    splits = rules.split_count_c(case.B * -(-S // tile_s), dtiles, 2 * sms)
    address = BASE + (elem if case.layout == "offset" else 0)
    threads = _geometry(rules)["plan_threads"]
    return dict(
        kernel="wmma" if half else "simt",
        tiles_per_block=rules.tiles_per_split_c(dtiles, splits) if case.B else 0,
        r_is_s=case.B > 0 and r == S,
        unvectorized=case.B > 0 and half and not rules.vector_loads_c(case.C, address),
        pack_width=rules.pack_width_c(case.C, elem, address, BASE) if case.B else None,
        layout=case.layout if case.B else None,
        scan_chunks=min(-(-N // threads), -(-(N - r) // threads)) if case.B else 0,
    )


@pytest.mark.parametrize("sms", SM_COUNTS)
def test_self_check_cases_reach_the_paths_real_workloads_take(rules, sms):
    props = [_properties(rules, case, sms) for case in selfcheck.SELF_CHECK_CASES]
    for kernel in ("wmma", "simt"):
        assert any(p["kernel"] == kernel and p["tiles_per_block"] >= 2 for p in props), f"{kernel}: one dst tile per block"
    assert any(p["r_is_s"] for p in props), "no case with r = S"
    assert any(p["unvectorized"] for p in props), "the tensor-core kernel always loads 8-element vectors"
    assert any(p["pack_width"] == 1 for p in props), "merge / unmerge always move packs of several elements"
    assert {"offset", "strided"} <= {p["layout"] for p in props}, "no offset or no non-contiguous input"
    assert any(p["scan_chunks"] >= 2 for p in props), "no block scan with several items per thread on both scans"
    assert any(case.B == 0 for case in selfcheck.SELF_CHECK_CASES)
    assert {case.dtype for case in selfcheck.SELF_CHECK_CASES} == {"float16", "bfloat16", "float32"}


def test_geometry_rules(rules):
    assert rules.tiles_per_split_c(16, 8) == 2 and rules.tiles_per_split_c(9, 5) == 2 and rules.tiles_per_split_c(3, 3) == 1
    assert rules.vector_loads_c(40, BASE) and not rules.vector_loads_c(40, BASE + 2) and not rules.vector_loads_c(36, BASE)
    assert rules.pack_width_c(40, 2, BASE, BASE) == 8 and rules.pack_width_c(40, 2, BASE + 2, BASE) == 1
    assert rules.pack_width_c(33, 4, BASE, BASE) == 1 and rules.pack_width_c(36, 4, BASE, BASE + 8) == 2


def test_no_kernel_puts_the_batch_on_grid_y_or_z():
    """gridDim.y and .z stop at 65,535: the batch is folded into grid.x (blockIdx.x / src tiles), so
    any batch size launches."""
    for source in loader.csrc_dir().glob("*.cu"):
        text = source.read_text()
        assert "blockIdx.z" not in text and "gridDim.z" not in text, source.name
        for grid in re.findall(r"dim3 grid\(([^;]*)\);", text):
            assert grid.count(",") <= 1 and "a.B" in grid.split(",")[0], (source.name, grid)


def _cells_ok_on_the_cpu(dst, h, w, sx, sy) -> bool:
    try:
        check_window(h * w, dst, h, w, sx, sy, 3)
    except ValueError:
        return False
    return True


def test_one_dst_per_cell_is_the_cpu_ops_rule(rules):
    """The CUDA local ops' TOMESD_CHECK_INDICES=1 check (csrc/ops.cpp check_cells) refuses exactly the
    dst_idx the CPU ops refuse: two dst in a cell, an empty cell, a dst in a remainder row or column."""
    cases = []
    for h, w, sx, sy in [(8, 8, 2, 2), (9, 7, 2, 3), (13, 21, 4, 4), (5, 40, 2, 2), (3, 3, 4, 4)]:
        dst, _ = matching.partition(h, w, sx, sy, torch.tensor(h * w), "cpu")
        cases.append((dst, h, w, sx, sy))
        if len(dst) >= 2:
            cases.append((torch.cat([dst[:1], dst[:1] + 1, dst[2:]]), h, w, sx, sy))  # two in the first cell
            cases.append((dst[1:], h, w, sx, sy))  # the first cell has none
            cases.append((torch.cat([dst[:-1], torch.tensor([h * w - 1])]), h, w, sx, sy))
    cases.append((torch.tensor([8 * 8 - 1] * 16), 8, 8, 2, 2))
    verdicts = []
    for dst, h, w, sx, sy in cases:
        arr = (ctypes.c_int64 * max(1, len(dst)))(*dst.tolist())
        got = bool(rules.one_dst_per_cell_c(arr, len(dst), h, w, sx, sy))
        assert got == _cells_ok_on_the_cpu(dst, h, w, sx, sy), (dst.tolist(), h, w, sx, sy)
        verdicts.append(got)
    assert True in verdicts and False in verdicts
    ops_cpp = (loader.csrc_dir() / "ops.cpp").read_text()
    assert "if (check_indices()) check_cells(dst_idx" in ops_cpp
