"""The out-of-scope gate: fitted from data, refuses non-radiographs with a reason, passes real X-rays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pneumoscan.checkpoint import default_model_path, load_checkpoint, save_checkpoint
from pneumoscan.errors import OutOfScopeError
from pneumoscan.gate import OutOfScopeGate
from pneumoscan.inference import InferenceFailure, InferenceResult, MedicalImageInference, risk_level
from pneumoscan.scope_report import in_use_report, refusal_category

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"real chest X-rays not found at {DATA}")


def test_fit_sets_threshold_at_validation_quantile():
    gen = torch.Generator().manual_seed(0)
    labels = (torch.rand(2000, generator=gen) > 0.5).long()
    train = [torch.randn(2000, d, generator=gen) + 3.0 * labels[:, None] for d in (8, 16)]
    val = [torch.randn(1000, d, generator=gen) for d in (8, 16)]
    gate = OutOfScopeGate.fit(train, labels, val, layers=(0, 1), quantile=0.99)
    rejected = sum(not v.in_scope for v in gate.check_features(val))
    assert 5 <= rejected <= 15  # 1 % of 1,000, give or take rounding at the quantile
    far_in_one_layer = [torch.zeros(3, 8), torch.full((3, 16), 25.0)]
    assert not any(v.in_scope for v in gate.check_features(far_in_one_layer))
    restored = OutOfScopeGate.from_dict(gate.to_dict())
    assert torch.allclose(restored.scores([v[:10] for v in val]), gate.scores([v[:10] for v in val]), atol=1e-3)


def test_a_fitted_gate_records_its_limit_as_the_training_limit():
    """``calibrate --refit_gate`` caps a site's limit at 3x the training one and reports the ratio: a fitted gate
    must store that limit, not the infinity it starts from (as every fit did until 2026-12-02)."""
    gen = torch.Generator().manual_seed(1)
    labels = (torch.rand(400, generator=gen) > 0.5).long()
    gate = OutOfScopeGate.fit([torch.randn(400, 8, generator=gen)], labels, [torch.randn(200, 8, generator=gen)],
                              layers=(0,), quantile=0.99)
    assert np.isfinite(gate.threshold) and gate.base_threshold == gate.threshold
    assert OutOfScopeGate.from_dict(gate.to_dict()).base_threshold == gate.threshold
    stored_by_the_bug = {**gate.to_dict(), "base_threshold": float("inf")}
    assert OutOfScopeGate.from_dict(stored_by_the_bug).base_threshold == gate.threshold


def test_a_site_gate_without_its_training_limit_says_so(caplog):
    """A gate site-refitted before the fix stored no training limit: the site limit stands in for it, which
    ``calibrate --refit_gate`` must not do silently; a plain trained gate falls back quietly."""
    gen = torch.Generator().manual_seed(2)
    gate = OutOfScopeGate.fit([torch.randn(200, 8, generator=gen)], (torch.rand(200, generator=gen) > 0.5).long(),
                              [torch.randn(100, 8, generator=gen)], layers=(0,), quantile=0.99)
    with caplog.at_level("WARNING", logger="pneumoscan.gate"):
        OutOfScopeGate.from_dict({**gate.to_dict(), "base_threshold": float("inf")})
        assert not caplog.records
        site = OutOfScopeGate.from_dict({**gate.to_dict(), "base_threshold": float("inf"), "threshold": 2.0,
                                         "fitted_on": "site north's films"})
    assert site.base_threshold == 2.0
    assert "site north's films" in caplog.text and "training limit was not stored" in caplog.text


def test_a_raised_limit_reports_what_the_distance_stage_gives_up_on_the_stored_out_of_scope_sets():
    """``calibrate --refit_gate`` says how many of the out-of-scope films stored with the gate the distance stage
    alone would still catch: counted from those scores at the old and the new limit, not from a fixed text."""
    from pneumoscan.site_calibration import _caution, refit_gate_limit

    gen = torch.Generator().manual_seed(3)
    labels = (torch.rand(300, generator=gen) > 0.5).long()
    gate = OutOfScopeGate.fit([torch.randn(300, 8, generator=gen)], labels, [torch.randn(200, 8, generator=gen)],
                              layers=(0,), quantile=0.99)
    far = [torch.randn(40, 8, generator=gen) * 3]  # out-of-scope stand-ins: most score above the limit
    gate.reference = {"far films": gate.scores(far).tolist()}
    stored = OutOfScopeGate.from_dict(gate.to_dict())
    assert stored.reference == gate.reference
    before = stored.reference_caught()["far films"]
    assert before["n"] == 40 and before["above"] == int((gate.scores(far) > gate.threshold).sum()) > 20

    site = [torch.randn(100, 8, generator=gen) * 1.3]  # a site whose valid films sit further out
    new_dict, record = refit_gate_limit(gate.to_dict(), site, np.arange(100) % 5)
    new = new_dict["threshold"]
    assert new > gate.threshold and new_dict["reference"] == gate.reference  # carried to the site checkpoint
    alone = record["distance_stage_alone"]["far films"]
    assert alone == {"n": 40, "caught_before": before["above"],
                     "caught_after": int((gate.scores(far) > new).sum())}
    assert alone["caught_after"] < alone["caught_before"]
    text = _caution(record["distance_stage_alone"], record["scope_classifier"])
    assert f"{alone['caught_after']} instead of {alone['caught_before']} of the 40 far films" in text
    assert "no scope classifier" in text  # none was given: nothing else checks the features
    with_classifier = refit_gate_limit(gate.to_dict(), site, np.arange(100) % 5, in_scope=np.ones(100, bool))[1]
    assert "the scope classifier, which checks every input as well, is unchanged, but these films are among" in \
        _caution(with_classifier["distance_stage_alone"], with_classifier["scope_classifier"])
    # raising a site limit again reports the cost against the training limit too, not only the last step
    further = [torch.randn(100, 8, generator=gen) * 1.6]
    _, again = refit_gate_limit(new_dict, further, np.arange(100) % 5)
    assert again["distance_stage_alone"]["far films"]["caught_before"] == alone["caught_after"]
    assert again["distance_stage_alone"]["far films"]["caught_at_training_limit"] == before["above"]
    assert f"({before['above']} at the training limit)" in _caution(again["distance_stage_alone"])
    # a gate fitted without them says that this was not measured, instead of quoting another model's numbers
    _, bare = refit_gate_limit({**gate.to_dict(), "reference": {}}, site, np.arange(100) % 5)
    assert "distance_stage_alone" not in bare
    assert "not measured for this model" in _caution(bare.get("distance_stage_alone"))
    with pytest.raises(ValueError, match="reference scores"):
        OutOfScopeGate.from_dict({**gate.to_dict(), "reference": [1.0, 2.0]})


def test_a_gate_of_an_older_kind_is_refused():
    with pytest.raises(ValueError, match="older kind"):
        OutOfScopeGate.from_dict({"means": torch.zeros(2, 4), "threshold": 1.0})


@pytest.fixture(scope="module")
def engine() -> MedicalImageInference:
    eng = MedicalImageInference()
    assert eng.gate is not None, "the shipped model must carry its out-of-scope gate"
    return eng


def _save(img: Image.Image | np.ndarray, path: Path) -> Path:
    (Image.fromarray(img) if isinstance(img, np.ndarray) else img).save(path)
    return path


def test_real_radiographs_pass(engine):
    files = sorted((DATA / "chest_xray/train/NORMAL").glob("*.jpeg"))[:4]
    files += sorted((DATA / "fullres_sample/PNEUMONIA").glob("*.jpeg"))[:4]
    outcomes = engine.predict_batch(files)
    assert all(isinstance(o, InferenceResult) for o in outcomes), [getattr(o, "error", "") for o in outcomes]


@pytest.mark.parametrize("kind, reason", [
    ("blank", "blank or uniform"),
    ("colour_photo", "colour image"),
    ("gray_photo", "not a radiograph"),  # the scope classifier's reason, more specific than the distance's
    ("noise", "out of scope"),
    ("document", "out of scope"),
])
def test_non_radiographs_refused_with_reason(engine, tmp_path, kind, reason):
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(1)
    # scikit-learn's flower photo; the gate misses some grayscale photos (the China one among
    # them): the measured catch rate per category is in docs/gate.md
    photo = Image.fromarray(load_sample_images().images[1])
    doc = Image.new("L", (600, 800), 255)
    from PIL import ImageDraw

    draw = ImageDraw.Draw(doc)
    for y in range(40, 760, 18):
        draw.text((40, y), "discharge summary: medication 5 mg twice daily, review in clinic", fill=0)
    images = {
        "blank": np.full((300, 300), 128, np.uint8),
        "colour_photo": photo,
        "gray_photo": photo.convert("L"),
        "noise": (rng.random((400, 400)) * 255).astype(np.uint8),
        "document": doc,
    }
    path = _save(images[kind], tmp_path / f"{kind}.png")
    [outcome] = engine.predict_batch([path])
    assert isinstance(outcome, InferenceFailure)
    assert outcome.error_type == "OutOfScopeError"
    assert reason in outcome.error and str(path) in outcome.error
    with pytest.raises(OutOfScopeError, match="out of scope"):
        engine.predict_image(path)


def test_checkpoint_without_gate_predicts_with_warning(tmp_path, caplog):
    ckpt = load_checkpoint(default_model_path())
    ckpt["ood_gate"] = None
    ckpt["scope_classifier"] = None
    save_checkpoint(ckpt, tmp_path / "nogate.pth")
    eng = MedicalImageInference(tmp_path / "nogate.pth")
    assert "no out-of-scope gate" in caplog.text and eng.scope is None
    path = _save(np.full((300, 300), 128, np.uint8), tmp_path / "blank.png")
    assert isinstance(eng.predict_batch([path])[0], InferenceResult)


def _quarter(img: Image.Image) -> Image.Image:
    """Resolution loss to 25 %: down and up again, as a site's thumbnailing or a re-enlarged copy does."""
    return img.resize((img.width // 4, img.height // 4), Image.BILINEAR).resize(img.size, Image.BILINEAR)


def test_detail_ratio_ignores_exposure_and_falls_with_lost_detail(real_records):
    from pneumoscan.gate import detail_ratio

    films = [np.asarray(Image.open(r.path).convert("L").resize((224, 224))) for r in real_records[:8]]
    plain = detail_ratio(np.stack(films))
    brighter = detail_ratio(np.stack([np.clip(f * 0.7 + 40, 0, 255).astype(np.uint8) for f in films]))
    quarter = detail_ratio(np.stack([np.asarray(_quarter(Image.fromarray(f))) for f in films]))
    assert torch.allclose(plain, brighter, rtol=0.05)  # exposure and contrast do not count as detail
    assert (quarter < 0.5 * plain).all()


def test_the_detail_floor_is_stored_and_optional():
    from pneumoscan.gate import detail_ratio

    gen = torch.Generator().manual_seed(4)
    gate = OutOfScopeGate.fit([torch.randn(50, 3, generator=gen)], torch.zeros(50, dtype=torch.long),
                              [torch.randn(20, 3, generator=gen)], layers=(0,), quantile=0.99)
    sharp = torch.randint(0, 256, (20, 32, 32), generator=gen).to(torch.uint8)
    assert gate.low_detail(sharp[:2]) == ["", ""]  # no floor fitted: no check
    floor = gate.fit_detail(sharp, quantile=0.1)
    assert OutOfScopeGate.from_dict(gate.to_dict()).min_detail == floor
    flat = torch.full((1, 32, 32), 100, dtype=torch.uint8)
    flat[0, :, 16:] = 150  # one edge: almost no fine detail
    assert gate.low_detail(flat)[0].startswith("much less fine detail than the training films")
    assert "10.0% of the training films are below" in gate.low_detail(flat)[0]  # the quantile it was fitted at
    sharpest = int(detail_ratio(sharp).argmax())
    assert gate.low_detail(sharp[sharpest:sharpest + 1]) == [""]
    assert detail_ratio(torch.full((1, 8, 8), 77, dtype=torch.uint8)).item() == 0.0  # a flat image has no detail
    with pytest.raises(ValueError, match="at least 3 x 3"):
        detail_ratio(torch.zeros((1, 2, 2), dtype=torch.uint8))


def test_the_low_detail_texts_neither_force_high_risk_nor_change_a_refusal_category():
    """The warning only keeps an answer from LOW (it does not force HIGH as the markers in
    UNVALIDATED_WARNINGS do), and the note on a refusal must not make ``evaluate`` count it under another
    reason."""
    from pneumoscan.inference import LOW_DETAIL, LOW_DETAIL_NOTE, UNVALIDATED_WARNINGS
    from pneumoscan.scope_report import REFUSAL_CATEGORIES

    for text in (LOW_DETAIL, LOW_DETAIL_NOTE):
        assert not any(m in text.lower() for m in UNVALIDATED_WARNINGS)
        assert not any(marker in text for _, marker in REFUSAL_CATEGORIES)


def test_a_downscaled_film_is_answered_with_a_low_detail_warning_or_refused_saying_so(engine, real_records,
                                                                                      tmp_path, monkeypatch):
    """The shipped model on real films and on their 25 %-resolution copies: the copies' results carry the
    warning, and never risk LOW (the seed's rule would give LOW to some: they get MEDIUM), or, refused, a reason
    saying that the detail was lost; the originals never do."""
    assert engine.gate.min_detail is not None and engine.info["detail_check"], "the shipped gate has its floor"
    originals, copies = [], []
    for r in real_records[::400][:12]:
        img = Image.open(r.path).convert("L")
        originals.append(tmp_path / f"{r.path.stem}.png")
        copies.append(tmp_path / f"{r.path.stem}_quarter.png")
        img.save(originals[-1])
        _quarter(img).save(copies[-1])
    for out in engine.predict_batch(originals):
        text = " ".join(out.warnings) if isinstance(out, InferenceResult) else out.error
        assert "fine detail" not in text
    seed_low = 0
    risks = []
    outcomes = engine.predict_batch(copies)
    counted = in_use_report(outcomes, np.zeros(len(outcomes), int))  # pneumoscan evaluate's "in use" counts
    assert counted["answered_with_low_detail_warning"] == counted["answered"] > 0
    assert counted["refused_with_low_detail_note"] == counted["refused"]
    for out in outcomes:
        if isinstance(out, InferenceResult):
            assert any(w.startswith("low detail: much less fine detail") for w in out.warnings)
            risks.append(out.risk_level)
            seed_low += risk_level(out.confidence, out.uncertainty) == "LOW"
        else:
            assert "note: the image has much less fine detail" in out.error and "send the original" in out.error
    assert "LOW" not in risks and seed_low > 0 and risks.count("MEDIUM") >= seed_low
    # refused, a copy's reason keeps its category and says the detail was lost (forced here: the distance stage
    # refuses everything, which no film of these 12 copies gets otherwise)
    monkeypatch.setattr(engine.gate, "threshold", float("-inf"))
    monkeypatch.setattr(engine, "scope", None)
    for out in engine.predict_batch(copies[:3]):
        assert isinstance(out, InferenceFailure) and refusal_category(out.error) == "feature_distance"
        assert "; note: the image has much less fine detail" in out.error and "send the original" in out.error


def test_a_thumbnail_is_refused_as_too_small_while_a_reduced_decode_of_a_film_is_not(engine, real_records, tmp_path):
    from pneumoscan.gate import MIN_SIDE
    from pneumoscan.preprocess import decode_image

    film = Image.open(real_records[0].path).convert("L")
    small = tmp_path / "thumb.png"
    film.resize((MIN_SIDE - 1, 2 * MIN_SIDE)).save(small)  # the short side decides
    just = tmp_path / "just.png"
    film.resize((MIN_SIDE, MIN_SIDE)).save(just)
    thumb, ok = engine.predict_batch([small, just])
    assert isinstance(thumb, InferenceFailure) and thumb.error_type == "OutOfScopeError"
    assert f"image too small ({MIN_SIDE - 1}x{2 * MIN_SIDE} pixels" in thumb.error and "original film" in thumb.error
    assert refusal_category(thumb.error) == "too_small"  # the scope report counts it under its own reason
    assert "too small" not in (ok.error if isinstance(ok, InferenceFailure) else " ".join(ok.warnings))
    # JPEG draft decoding for a small model input (here 16 px) reduces a 224 px film below the floor: its stored
    # size counts
    decoded = decode_image(real_records[0].path, 16)
    assert min(decoded.gray.size) < MIN_SIDE <= min(decoded.size) == min(Image.open(real_records[0].path).size)
    assert engine.gate.check_pixels(np.asarray(decoded.gray), decoded.colorfulness, decoded.size).in_scope


def test_a_small_input_model_does_not_refuse_its_films_as_too_small(trained_model, real_records, tmp_path):
    # a 32 px model decodes a 224 px JPEG at 56 px (draft mode): the floor must read the file's own size
    path = tmp_path / "small_input.pth"
    ckpt = load_checkpoint(trained_model)
    save_checkpoint({**ckpt, "input_spec": {**ckpt["input_spec"], "image_size": 32}}, path)
    engine = MedicalImageInference(str(path), device="cpu", backend="torch")
    outcomes = engine.predict_batch([r.path for r in real_records[:3]])
    errors = [getattr(o, "error", "") for o in outcomes]
    assert not any("too small" in e for e in errors), errors


def test_wide_precision_matrices_are_stored_packed_and_score_as_before(tmp_path):
    from pneumoscan.checkpoint import FORMAT, PACKED_GATE_FORMAT_VERSION, format_version
    from pneumoscan.gate import PACK_ABOVE_DIM, pack_symmetric, unpack_symmetric

    gen = torch.Generator().manual_seed(3)
    wide, narrow = PACK_ABOVE_DIM * 2, 16  # a two-network ensemble's last block, and a small one
    labels = (torch.rand(3000, generator=gen) > 0.5).long()
    train = [torch.randn(3000, narrow, generator=gen), torch.randn(3000, wide, generator=gen)]
    val = [torch.randn(300, narrow, generator=gen), torch.randn(300, wide, generator=gen)]
    gate = OutOfScopeGate.fit(train, labels, val, layers=(0, 1))
    stored = gate.to_dict()
    assert stored["precisions"][0].dim() == 2 and stored["precisions"][1].shape == (wide * (wide + 1) // 2,)
    back = OutOfScopeGate.from_dict(stored)
    torch.testing.assert_close(back.precisions[1], gate.precisions[1].float(), rtol=0, atol=1e-6)
    assert torch.equal(back.precisions[1], back.precisions[1].T)
    torch.testing.assert_close(back.scores(val), gate.scores(val), rtol=1e-6, atol=0)
    # a checkpoint holding it is written as format 5 (an older pneumoscan refuses it rather than misread it),
    # also when the gate is added to a checkpoint made without one
    payload = {"format": FORMAT, "format_version": 2, "input_spec": {"intensity": "raw"}, "ood_gate": stored}
    assert format_version(payload) == PACKED_GATE_FORMAT_VERSION
    save_checkpoint(payload, tmp_path / "wide.pth")
    assert torch.load(tmp_path / "wide.pth", weights_only=True)["format_version"] == PACKED_GATE_FORMAT_VERSION
    assert format_version({**payload, "ood_gate": OutOfScopeGate.fit(train[:1], labels, val[:1]).to_dict()}) == 2
    with pytest.raises(ValueError, match="packed 4x4"):
        unpack_symmetric(pack_symmetric(torch.eye(3)), 4)


def test_the_shipped_gate_is_stored_whole_and_reads_back_unchanged():
    ckpt = load_checkpoint(default_model_path())
    gate = OutOfScopeGate.from_dict(ckpt["ood_gate"])
    again = gate.to_dict()
    assert all(p.dim() == 2 for p in again["precisions"])  # no block wider than PACK_ABOVE_DIM
    for a, b in zip(again["precisions"], ckpt["ood_gate"]["precisions"]):
        assert torch.equal(a, b)
