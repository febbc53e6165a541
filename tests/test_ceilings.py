"""benchmarks/ceilings.py: the counted ceilings agree with closed-form FLOP ratios of the architectures (so the
merged sub-layers it reads are the ones tokens / kv mode merge), and its command line is strict."""
import json

import pytest

from test_bench_highres import run


def flux_flops(image: int, merged: int, kv: bool, mlp: bool, d=3072, text=512, double=19, single=38) -> float:
    """Multiply-adds of the Flux.1 dev blocks on `image` tokens, their merged sub-layers on `merged` (x2 omitted;
    modulation, embedders and the final layer are < 0.1%)."""
    def joint(n_q, n_kv):  # QK^T and AV over the joint sequence
        return 2 * n_q * n_kv * d

    full = image + text
    if kv:
        return (double + single) * (12 * d * d * full + joint(full, merged + text))
    short = merged + text
    double_block = 4 * d * d * (merged + text) + 8 * d * d * ((merged if mlp else image) + text) + joint(short, short)
    single_block = 12 * d * d * short + joint(short, short)  # linear1 d -> 7d, linear2 5d -> d
    return double * double_block + single * single_block


@pytest.mark.slow  # the 12B-parameter model is built twice on the meta device: seconds, no memory
def test_flux_ceilings_match_the_closed_form(tmp_path):
    out = tmp_path / "ceilings.json"
    proc = run("benchmarks/ceilings.py", "--models", "flux", "--sizes", "512", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = {r["setting"]: r for r in json.loads(out.read_text())}
    image = (512 // 16) ** 2
    base = flux_flops(image, image, kv=False, mlp=False)
    want = {"kv 0.5 (today's default)": base / flux_flops(image, image // 2, kv=True, mlp=False),
            "tokens 0.5": base / flux_flops(image, image // 2, kv=False, mlp=False),
            "tokens 0.5, mlp": base / flux_flops(image, image // 2, kv=False, mlp=True),
            "tokens 0.75, mlp": base / flux_flops(image, image // 4, kv=False, mlp=True)}
    assert set(rows) == set(want)
    for setting, ceiling in want.items():
        assert rows[setting]["ceiling"] == pytest.approx(ceiling, rel=0.01), setting
    assert 1.0 < rows["kv 0.5 (today's default)"]["ceiling"] < rows["tokens 0.5"]["ceiling"] < rows["tokens 0.5, mlp"]["ceiling"]


@pytest.mark.parametrize("argv,message", [(["--models", "sd4"], "--models: unknown sd4"),
                                          (["--sizes", "1000"], "--sizes: expected multiples of 64")])
def test_bad_arguments_are_named(argv, message):
    proc = run("benchmarks/ceilings.py", *argv)
    assert proc.returncode == 2 and message in proc.stderr
