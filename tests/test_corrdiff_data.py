"""Weather data layer: round trips against the exact benchmark, CWB / plain readers, errors, atomic writes."""
import json
import os

import netCDF4
import numpy as np
import pytest
import xarray as xr

from fastgen_sci.domains.corrdiff import data as D
from fastgen_sci.domains.corrdiff import readers as R
from fastgen_sci.domains.corrdiff import writers
from fastgen_sci.domains.corrdiff.benchmark import VARIABLES, DownscalingBenchmark
from fastgen_sci.domains.corrdiff.terrain import block_mean, load_terrain

T, SEED = 24, 5


@pytest.fixture(scope="module")
def bench():
    return DownscalingBenchmark(N=32, b=4)


@pytest.fixture(scope="module")
def default_path(bench, tmp_path_factory):
    return writers.write_default_dataset(tmp_path_factory.mktemp("default") / "data.nc", benchmark=bench, n_times=T,
                                         seed=SEED)


@pytest.fixture(scope="module")
def data(default_path):
    return R.open_dataset(default_path)


def test_default_round_trip_reproduces_the_benchmark(bench, data):
    x = bench.sample_truth(T, seed=SEED)  # [T, 3, 32, 32]
    y = bench.coarse(x, seed=SEED)  # [T, 3, 8, 8]
    assert data.input_vars == data.output_vars == VARIABLES and len(data) == T and data.factor == (4, 4)
    out, inp = data.outputs(slice(None)), data.inputs(slice(None))
    assert out.dtype == inp.dtype == np.float32 and inp.shape == out.shape == (T, 3, 32, 32)
    np.testing.assert_array_equal(out, x.astype(np.float32))
    np.testing.assert_array_equal(inp, np.repeat(np.repeat(y.astype(np.float32), 4, axis=-2), 4, axis=-1))
    np.testing.assert_allclose(block_mean(inp.astype(np.float64), 4), y, rtol=1e-6, atol=1e-6)
    patch = load_terrain(bench.terrain, N=32)
    np.testing.assert_array_equal(data.invariants(), np.stack([patch.elevation, patch.land_mask]))
    np.testing.assert_allclose(data.lat, patch.lat) and np.testing.assert_allclose(data.lon, patch.lon)
    assert data.time[0] == np.datetime64("2020-01-01T00") and np.all(np.diff(data.time) == np.timedelta64(1, "h"))
    np.testing.assert_array_equal(data.outputs([7, 2, 7]), out[[7, 2, 7]])  # any order, repeats


def test_lazy_reads_agree_with_eager(default_path, data):
    lazy = R.open_dataset(default_path, eager=False)
    assert not isinstance(lazy.output_store.arrays[0]._data, np.ndarray)  # nothing loaded yet
    np.testing.assert_array_equal(lazy.inputs([3, 1]), data.inputs([3, 1]))
    D.validate(lazy)


def test_bilinear_upsampling_is_linear_interpolation_inside(default_path):
    ramp = np.arange(8, dtype=np.float32)[None].repeat(8, 0)  # [8, 8], value = column
    up = D.upsample(ramp, factor=(4, 4), mode="bilinear")  # [32, 32]
    centre = (np.arange(32) + 0.5) / 4 - 0.5  # coarse coordinate of each fine column (align_corners=False)
    inside = (centre >= 0) & (centre <= 7)
    np.testing.assert_allclose(up[:, inside], np.broadcast_to(centre[inside], (32, inside.sum())), atol=1e-6)
    bil = R.open_dataset(default_path, upsample="bilinear")
    nearest = R.open_dataset(default_path).inputs(0)
    assert bil.inputs(0).shape == nearest.shape == (1, 3, 32, 32) and not np.array_equal(bil.inputs(0), nearest)


def test_same_seed_writes_identical_data(bench, default_path, tmp_path):
    again = writers.write_default_dataset(tmp_path / "a" / "data.nc", benchmark=bench, n_times=T, seed=SEED)
    other = writers.write_default_dataset(tmp_path / "b" / "data.nc", benchmark=bench, n_times=T, seed=SEED + 1)
    d0, d1, d2 = (R.open_dataset(p) for p in (default_path, again, other))
    np.testing.assert_array_equal(d0.outputs(slice(None)), d1.outputs(slice(None)))
    np.testing.assert_array_equal(d0.inputs(slice(None)), d1.inputs(slice(None)))
    assert (again.parent / "stats.json").read_text() == (default_path.parent / "stats.json").read_text()
    assert not np.allclose(d0.outputs(slice(None)), d2.outputs(slice(None)))


def test_stats_json_and_file_layout(default_path, data):
    stats = json.loads((default_path.parent / "stats.json").read_text())
    with netCDF4.Dataset(default_path) as nc:
        assert set(nc.groups) == {"input", "output", "invariant"}
        assert nc["lat"].dimensions == ("y", "x") and nc["time"].units == "hours since 2020-01-01 00:00:00"
        assert nc["output/t2m"].units == "K" and nc["output/u10"].units == "m s-1"
        assert nc["invariant/elevation"].units == "m" and nc["invariant/land_fraction"].units == "1"
        assert nc["input/t2m"].dimensions == ("time", "y_lr", "x_lr")
        assert nc["output/v10"].dimensions == ("time", "y", "x")
        for group in ("input", "output", "invariant"):
            for name, var in nc[group].variables.items():
                a = np.asarray(var[:], dtype=np.float64)
                assert stats[group][name]["mean"] == pytest.approx(a.mean(), rel=1e-9, abs=1e-9)
                assert stats[group][name]["std"] == pytest.approx(a.std(), rel=1e-9)
    z = data.normalize("output", data.outputs(slice(None)))
    np.testing.assert_allclose(z.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=(0, 2, 3)), 1, rtol=1e-5)
    np.testing.assert_allclose(data.denormalize("output", z), data.outputs(slice(None)), rtol=1e-6)


def test_condition_is_normalised_inputs_then_invariants(data):
    c = data.condition([0, 1])
    assert c.shape == (2, 5, 32, 32)
    np.testing.assert_allclose(c[:, :3], data.normalize("input", data.inputs([0, 1])), rtol=1e-6)
    np.testing.assert_allclose(c[1, 3:], data.normalize("invariant", data.invariants()), rtol=1e-6)
    import torch
    t = data.normalize("output", torch.from_numpy(data.outputs(0)))
    assert isinstance(t, torch.Tensor) and np.allclose(t.numpy(), data.normalize("output", data.outputs(0)))


def _cwb_arrays(T=6, C=2, H=16):
    rng = np.random.default_rng(0)
    inputs = rng.normal(280.0, 3.0, (T, C, H, H)).astype(np.float32)
    outputs = rng.normal(0.0, 2.0, (T, 3, H, H)).astype(np.float32)
    lat, lon = np.meshgrid(np.linspace(22, 25, H), np.linspace(120, 122, H), indexing="ij")
    time = np.datetime64("2021-06-01T00", "ns") + np.arange(T) * np.timedelta64(1, "h")
    return dict(inputs=inputs, outputs=outputs, input_vars=["temperature_2m", "msl"],
                output_vars=["t2m", "u10", "v10"], time=time, lat=lat, lon=lon)


def test_cwb_round_trip_skips_invalid_times(tmp_path):
    a = _cwb_arrays()
    a["inputs"][2, 1, 3, 3] = np.nan  # invalid time: must be skipped, not reported
    elev = np.full((1, 16, 16), 100.0, dtype=np.float32)
    path = writers.write_cwb_zarr(tmp_path / "cwb.zarr", valid=np.arange(6) != 2, invariants=elev,
                                  invariant_vars=["elevation"], **a)
    assert (path / ".zmetadata").is_file() and json.loads((path / "cwb" / ".zarray").read_text())["zarr_format"] == 2
    d = R.open_dataset(path, output_vars=["v10", "t2m"])
    assert len(d) == 5 and list(d.store_index) == [0, 1, 3, 4, 5] and d.time[2] == a["time"][3]
    np.testing.assert_array_equal(d.outputs(slice(None)), a["outputs"][[0, 1, 3, 4, 5]][:, [2, 0]])
    np.testing.assert_array_equal(d.inputs(slice(None)), a["inputs"][[0, 1, 3, 4, 5]])
    ok = np.arange(6) != 2
    assert d.stats["output"]["v10"]["mean"] == pytest.approx(a["outputs"][ok][:, 2].mean(), rel=1e-5)
    assert d.invariant_vars == ("elevation",) and d.condition(0).shape == (1, 3, 16, 16)
    np.testing.assert_allclose(d.lat, a["lat"])


def test_cwb_levels_name_channels_and_per_channel_valid_masks(tmp_path):
    a = _cwb_arrays(T=4)
    ds = xr.open_zarr(writers.write_cwb_zarr(tmp_path / "one.zarr", **a)).load()
    ds["era5_pressure"] = ("era5_channel",), np.array([np.nan, 500.0])
    ds["era5_valid"] = ds["era5_valid"].copy(data=np.array([[1, 1], [1, 0], [0, 1], [1, 1]], dtype=bool))
    ds.to_zarr(tmp_path / "two.zarr", zarr_format=2, consolidated=True)
    d = R.open_dataset(tmp_path / "two.zarr")
    assert d.input_vars == ("temperature_2m", "msl_500") and list(d.store_index) == [0, 3]
    only_t2m = R.open_dataset(tmp_path / "two.zarr", input_vars=["temperature_2m"])
    assert list(only_t2m.store_index) == [0, 1, 3]  # channel 1 is invalid at time 1, but it is not read
    np.testing.assert_array_equal(only_t2m.inputs(1)[0, 0], a["inputs"][1, 0])


def test_cwb_nan_at_a_valid_time_names_variable_and_time(tmp_path):
    a = _cwb_arrays()
    a["outputs"][4, 2, 0, 5] = np.inf
    path = writers.write_cwb_zarr(tmp_path / "bad.zarr",
                                  stats={g: {v: {"mean": 0.0, "std": 1.0} for v in a[f"{g}_vars"]}
                                         for g in ("input", "output")},
                                  **a)
    with pytest.raises(D.NonFiniteError, match=r"'v10'.*time index 4"):
        R.open_dataset(path)  # small store: scanned at open
    lazy = R.open_dataset(path, eager=False)  # big-store path: checked per batch
    assert lazy.outputs([0, 1]).shape == (2, 3, 16, 16)
    with pytest.raises(D.NonFiniteError, match=r"output variable 'v10'.*time index 4"):
        lazy.outputs([3, 4])
    with pytest.raises(D.NonFiniteError):
        D.validate(lazy)


def test_export_cwb_from_default_data(data, tmp_path):
    d = R.open_dataset(writers.export_cwb_zarr(tmp_path / "x.zarr", data))
    np.testing.assert_array_equal(d.inputs(slice(None)), data.inputs(slice(None)))
    np.testing.assert_array_equal(d.outputs(slice(None)), data.outputs(slice(None)))
    np.testing.assert_allclose(d.invariants(), data.invariants())
    assert d.stats["output"]["t2m"]["std"] == pytest.approx(data.stats["output"]["t2m"]["std"], rel=1e-6)


@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
def test_plain_xarray_dataset_with_computed_stats(tmp_path, suffix):
    rng = np.random.default_rng(1)
    ds = xr.Dataset({"t2m_era5": (("time", "y", "x"), rng.normal(270, 4, (5, 8, 12)).astype(np.float32)),
                     "t2m": (("time", "y", "x"), rng.normal(271, 5, (5, 8, 12)).astype(np.float32)),
                     "orography": (("y", "x"), rng.uniform(0, 900, (8, 12)).astype(np.float32))},
                    coords={"time": np.arange(5), "lat": ("y", np.linspace(40, 47, 8)),
                            "lon": ("x", np.linspace(5, 16, 12))})
    path = tmp_path / f"plain{suffix}"
    ds.to_netcdf(path) if suffix == ".nc" else ds.to_zarr(path, consolidated=False)  # Zarr v3, no consolidation
    d = R.open_dataset(path, input_vars=["t2m_era5"], output_vars=["t2m"], invariant_vars=["orography"])
    for group, name in (("input", "t2m_era5"), ("output", "t2m"), ("invariant", "orography")):
        assert d.stats[group][name]["mean"] == pytest.approx(float(ds[name].astype("f8").mean()), rel=1e-9)
        assert d.stats[group][name]["std"] == pytest.approx(float(ds[name].astype("f8").std()), rel=1e-9)
    assert d.lat.shape == (8, 12) and d.lat[3, 0] == d.lat[3, 11] and d.lon[0, 4] == d.lon[7, 4]
    np.testing.assert_array_equal(d.outputs(slice(None))[:, 0], ds["t2m"].values)


def test_missing_variable_errors_list_what_is_available(default_path, tmp_path):
    with pytest.raises(D.MissingVariableError, match=r"\['q2m'\] not found.*'t2m', 'u10', 'v10'"):
        R.open_dataset(default_path, output_vars=["t2m", "q2m"])
    ds = xr.Dataset({"a": (("time", "y", "x"), np.zeros((2, 4, 4))), "b": (("time", "y", "x"), np.zeros((2, 4, 4)))})
    with pytest.raises(D.MissingVariableError, match=r"input_vars= and output_vars=.*'a', 'b'"):
        R.read_xarray(ds)
    stats = json.loads((default_path.parent / "stats.json").read_text())
    del stats["output"]["v10"]
    writers.write_stats(tmp_path / "s.json", stats)
    with pytest.raises(D.MissingVariableError, match=r"output variable 'v10'"):
        R.open_dataset(default_path, stats=tmp_path / "s.json")


def test_grid_errors_say_what_was_expected(tmp_path):
    ds = xr.Dataset({"coarse": (("time", "y_lr", "x_lr"), np.zeros((2, 7, 7))),
                     "fine": (("time", "y", "x"), np.zeros((2, 32, 32)))})
    with pytest.raises(D.GridError, match=r"7 x 7 grid, outputs on 32 x 32.*integer multiple"):
        R.read_xarray(ds, input_vars="coarse", output_vars="fine")
    ok = xr.Dataset({"coarse": (("time", "y_lr", "x_lr"), np.zeros((2, 8, 8))),
                     "fine": (("time", "y", "x"), np.zeros((2, 32, 32))), "lat": (("half", "x"), np.zeros((16, 32))),
                     "lon": (("half", "x"), np.zeros((16, 32)))})
    with pytest.raises(D.GridError, match=r"lat \(16, 32\).*output grid \(32, 32\)"):
        R.read_xarray(ok, input_vars="coarse", output_vars="fine")
    assert R.read_xarray(ok.drop_vars(["lat", "lon"]), input_vars="coarse", output_vars="fine").factor == (4, 4)


def test_unknown_path_or_format_names_the_supported_formats(tmp_path):
    with pytest.raises(D.DataError, match="no such file.*hrrr-mini.*cwb.*xarray"):
        R.open_dataset(tmp_path / "nope.nc")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(D.DataError, match="not a netCDF file or Zarr store.*hrrr-mini"):
        R.open_dataset(tmp_path / "notes.txt")
    with pytest.raises(D.DataError, match="unknown format 'grib'"):
        R.open_dataset(tmp_path / "notes.txt", format="grib")


def test_generate_netcdf_layout(tmp_path):
    M, Tn, H, W = 3, 2, 8, 8
    rng = np.random.default_rng(2)
    field = lambda *s: rng.normal(size=s).astype(np.float32)
    pred = xr.Dataset({v: (("member", "time", "y", "x"), field(M, Tn, H, W)) for v in VARIABLES})
    inp = xr.Dataset({v: (("time", "y", "x"), field(Tn, H, W)) for v in VARIABLES})
    lat, lon = np.meshgrid(np.arange(H) * 0.1, np.arange(W) * 0.1, indexing="ij")
    time = np.datetime64("2020-01-01T00", "ns") + np.arange(Tn) * np.timedelta64(6, "h")
    path = writers.write_generate_netcdf(tmp_path / "gen.nc", prediction=pred, input=inp, truth=inp, lat=lat, lon=lon,
                                        time=time)
    with netCDF4.Dataset(path) as nc:
        assert set(nc.groups) == {"input", "truth", "prediction"} and {"lat", "lon", "time"} <= set(nc.variables)
        assert nc["lat"].dimensions == nc["lon"].dimensions == ("y", "x") and nc["time"].dimensions == ("time",)
        assert nc["prediction/t2m"].dimensions == ("ensemble", "time", "y", "x")
        assert nc["truth/u10"].dimensions == nc["input/u10"].dimensions == ("time", "y", "x")
        assert nc["prediction/t2m"].units == "K" and nc["truth/v10"].units == "m s-1"
        np.testing.assert_array_equal(nc["prediction/u10"][:], pred["u10"].values)
    assert xr.open_dataset(path)["time"].values[1] == time[1]
    no_truth = writers.write_generate_netcdf(tmp_path / "g2.nc", prediction=pred, input=inp, truth=None, lat=lat,
                                             lon=lon, time=time)
    with netCDF4.Dataset(no_truth) as nc:
        assert set(nc.groups) == {"input", "prediction"}


def test_crash_while_writing_leaves_no_file(bench, tmp_path, monkeypatch):
    calls = []

    def crash(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 4:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    real = writers.put_variable
    monkeypatch.setattr(writers, "put_variable", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        writers.write_default_dataset(tmp_path / "d" / "data.nc", benchmark=bench, n_times=4, seed=0)
    assert list((tmp_path / "d").iterdir()) == []  # no data file, no stats.json, no temporary
    calls.clear()
    pred = xr.Dataset({"t2m": (("ensemble", "time", "y", "x"), np.zeros((1, 1, 2, 2)))})
    with pytest.raises(RuntimeError, match="disk full"):
        writers.write_generate_netcdf(tmp_path / "g.nc", prediction=pred, input=pred.isel(ensemble=0), truth=None,
                                      lat=np.zeros((2, 2)), lon=np.zeros((2, 2)), time=np.arange(1))
    assert list(tmp_path.glob("*g.nc*")) == []
    monkeypatch.setattr(writers, "put_variable", real)
    to_zarr = xr.Dataset.to_zarr

    def write_then_crash(self, *args, **kwargs):
        to_zarr(self, *args, **kwargs)  # the whole store is written under its temporary name, then the crash
        raise RuntimeError("disk full")

    monkeypatch.setattr(xr.Dataset, "to_zarr", write_then_crash)
    with pytest.raises(RuntimeError, match="disk full"):
        writers.write_cwb_zarr(tmp_path / "c.zarr", **_cwb_arrays())
    assert list(tmp_path.glob("*c.zarr*")) == []


def test_crash_while_overwriting_never_pairs_old_data_with_new_stats(bench, tmp_path, monkeypatch):
    path = writers.write_default_dataset(tmp_path / "data.nc", benchmark=bench, n_times=3, seed=0)
    write_stats = writers.write_stats

    def write_then_crash(*args, **kwargs):
        write_stats(*args, **kwargs)  # the new stats.json is in place; the new data file is not yet
        raise RuntimeError("killed")

    monkeypatch.setattr(writers, "write_stats", write_then_crash)
    with pytest.raises(RuntimeError, match="killed"):
        writers.write_default_dataset(path, benchmark=bench, n_times=3, seed=1)
    assert not path.exists() and [p.name for p in tmp_path.iterdir()] == ["stats.json"]


def test_flat_terrain_dataset_has_constant_invariants_and_finite_condition(tmp_path):
    flat = DownscalingBenchmark(N=16, b=4, terrain=None)
    d = R.open_dataset(writers.write_default_dataset(tmp_path / "flat.nc", benchmark=flat, n_times=2, seed=0))
    assert d.stats["invariant"]["elevation"] == {"mean": 0.0, "std": 0.0} and np.isfinite(d.condition([0, 1])).all()
    assert np.isfinite(d.lat).all() and d.lat.shape == (16, 16)


def test_default_dataset_is_written_once_per_configuration(bench, tmp_path):
    d = writers.default_dataset(tmp_path, benchmark=bench, n_times=3, seed=0)
    stamp = os.stat(d.source).st_mtime_ns
    assert writers.default_dataset(tmp_path, benchmark=bench, n_times=3, seed=0).source == d.source
    assert os.stat(d.source).st_mtime_ns == stamp  # reused, not rewritten
    assert writers.default_dataset(tmp_path, benchmark=bench, n_times=3, seed=1).source != d.source
