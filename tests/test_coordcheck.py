"""task=coordcheck (runner/coordcheck.py): under µP a tiny model's activations keep their size across a 4x width
range after a few Adam steps at a large lr; under SP they grow (Tensor Programs V, figure 5)."""
import pytest

from test_train import results, run

CHECK = ["task=coordcheck", "coordcheck.widths=[32,64,128]", "coordcheck.steps=4", "model.n_layers=2",
         "model.n_heads=4", "model.attention.n_kv_heads=2", "train.lr=1e-2", "data.seq_len=64",
         "data.max_documents=200"]
FACTOR = 2.0  # µP: every layer's RMS at the last step within 2x across widths 32..128


def spread(check, layer):
    values = [check["rms"][str(w)][layer][-1] for w in check["widths"]]
    return max(values) / min(values), values


@pytest.mark.slow
def test_mup_keeps_activations_flat_in_width_and_sp_lets_them_grow(tmp_path, cache_dir):
    run(["-m", "hydra.sweep.dir=sweep", *CHECK, "model.parametrization=sp,mup"], tmp_path, cache_dir)
    sp, mup = (results(p)["coord_check"] for p in sorted((tmp_path / "sweep").glob("[01]_*")))
    assert (sp["parametrization"], mup["parametrization"]) == ("sp", "mup")
    for layer in mup["rms"]["32"]:
        assert len(mup["rms"]["128"][layer]) == 4  # one value per step
        ratio, values = spread(mup, layer)
        assert ratio < FACTOR, (layer, values)
    assert 1 / FACTOR < mup["growth"] < FACTOR
    assert sp["growth"] > FACTOR  # the logits
    ratio, values = spread(sp, "block 1")
    assert ratio > 2 * FACTOR and values == sorted(values), values  # the residual stream grows with width
    assert (tmp_path / "sweep").glob("*/coordcheck.png")


@pytest.mark.slow
def test_coordcheck_widths_are_checked_before_any_data(tmp_path, cache_dir):
    out = run(["hydra.run.dir=run", "task=coordcheck", "coordcheck.widths=[64,32]"], tmp_path, cache_dir, check=False)
    assert out.returncode == 1 and "coordcheck.widths=[64, 32]" in out.stderr
    assert results(tmp_path / "run")["status"] == "failed"
    out = run(["hydra.run.dir=run2", "task=coordcheck", "coordcheck.widths=[30,60]"], tmp_path, cache_dir, check=False)
    assert out.returncode == 1 and "coordcheck.widths=[30, 60]: at d_model=30, " in out.stderr
