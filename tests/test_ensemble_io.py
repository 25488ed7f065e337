"""Lazy ensembles and resumable writes: values independent of blocking, crashes resumed without resampling."""
import os
import tracemalloc

import numpy as np
import pytest
import torch
import xarray as xr

from fastgen_sci.ensemble import MemberSampler, generate_ensemble, sample_ensemble
from fastgen_sci.registry import EvalCases
from fastgen_sci.samplers import SamplerSpec
from fastgen_sci.store import EnsembleStoreError, open_ensemble, write_ensemble

N, M, VARS, SHAPE = 6, 10, ["u", "v", "w"], (4, 5)
CHUNKS = (2, 4)  # 3 case chunks x 3 member chunks = 9 blocks
SPEC = SamplerSpec("few_step", sigmas=[0.821])  # two steps: fresh per-member noise in between


class Counting:
    """Wraps a sample_block: records each call's (case ids, member ids), raises on call `fail_at`."""

    def __init__(self, sample_block, fail_at: int | None = None):
        self.sample_block, self.fail_at, self.calls = sample_block, fail_at, []

    def __call__(self, case_ids, member_ids):
        if self.fail_at is not None and len(self.calls) + 1 == self.fail_at:
            raise RuntimeError("simulated crash")
        self.calls.append((tuple(case_ids.tolist()), tuple(member_ids.tolist())))
        return self.sample_block(case_ids, member_ids)


def offset_by_case(x, case_ids):  # a stand-in for physical decoding that depends on the case
    return x + 10.0 * case_ids.view(-1, 1, 1, 1).to(x.dtype)


@pytest.fixture
def member_sampler(gaussian_denoiser):
    return MemberSampler(gaussian_denoiser, SPEC, EvalCases(n=N, shape=(len(VARS), *SHAPE)), seed=7,
                         batch_size=5, decode=offset_by_case)


def ensemble(sample_block, chunks=CHUNKS, seed=7):
    times = np.arange(N).astype("datetime64[h]")
    return generate_ensemble(sample_block, cases=N, members=M, variables=VARS, shape=SHAPE, chunks=chunks,
                             coords={"time": times, "lat": (("y", "x"), np.linspace(20, 30, 20).reshape(SHAPE))},
                             attrs={"u": {"units": "m s-1"}}, attrs_global={"seed": seed, "sampler": repr(SPEC)})


def block_files(store):
    """(inode, mtime) of every data and coordinate chunk file of a store, by path."""
    out = {}
    for root, _, files in os.walk(store):
        for f in files:
            p = os.path.join(root, f)
            if f != "zarr.json" and not f.startswith(".") and ".fastgen" not in p:
                st = os.stat(p)
                out[p] = (st.st_ino, st.st_mtime_ns)
    return out


def test_lazy_dataset_equals_eager_and_samples_only_needed_blocks(member_sampler, gaussian_denoiser):
    eager = sample_ensemble(gaussian_denoiser, SPEC, member_sampler.cases, M, seed=7, progress=False)  # [N, M, V, *S]
    eager = offset_by_case(eager.flatten(0, 1), torch.arange(N).repeat_interleave(M)).view(N, M, len(VARS), *SHAPE)
    s = Counting(member_sampler)
    ds = ensemble(s)
    assert s.calls == [] and ds["u"].dims == ("member", "time", "y", "x") and ds["u"].attrs["units"] == "m s-1"
    assert ds.attrs["seed"] == 7 and ds.attrs["members"] == M and "fastgen_version" in ds.attrs

    full = ds.compute()
    assert len(s.calls) == 9  # one call per block, not one per block and variable
    for i, v in enumerate(VARS):
        np.testing.assert_array_equal(full[v].values, eager[:, :, i].transpose(0, 1).numpy())

    s.calls.clear()
    ds.isel(time=3, member=slice(0, 4)).compute()
    assert s.calls == [((2, 3), (0, 1, 2, 3))]
    s.calls.clear()
    ds["w"].isel(time=5).mean("member").compute()
    assert sorted(s.calls) == [((4, 5), (0, 1, 2, 3)), ((4, 5), (4, 5, 6, 7)), ((4, 5), (8, 9))]


def test_chunking_does_not_change_values(member_sampler):
    a, b, c = (ensemble(member_sampler, chunks=ch).compute() for ch in [(1, 1), (3, 4), (N, M)])
    xr.testing.assert_identical(a, b)
    xr.testing.assert_identical(a, c)


def test_bad_block_shape_is_one_clear_error():
    ds = ensemble(lambda c, m: np.zeros((len(c), len(m), 2, *SHAPE)))
    with pytest.raises(ValueError, match=r"expected \(2, 4, 3, 4, 5\)"):
        ds.isel(member=slice(0, 4), time=slice(0, 2)).compute()


def test_interrupted_zarr_write_resumes_without_resampling_or_rewriting(member_sampler, tmp_path):
    path = tmp_path / "ens.zarr"
    crashing = Counting(member_sampler, fail_at=5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_ensemble(ensemble(crashing), path, progress=False)
    done = set(crashing.calls)
    assert len(done) == 4 and len(os.listdir(path / ".fastgen" / "blocks")) == 4
    before = block_files(path)
    assert len(before) >= 4 * len(VARS)  # the finished blocks' chunks are on disk

    resumed = Counting(member_sampler)
    assert write_ensemble(ensemble(resumed), path, progress=False) == path
    assert len(resumed.calls) == 5 and not done & set(resumed.calls)  # only the unfinished blocks
    after = block_files(path)
    assert {p: after[p] for p in before} == before  # finished chunks (and coordinates) never rewritten
    assert not (path / ".fastgen").exists()

    reference = write_ensemble(ensemble(member_sampler), tmp_path / "ref.zarr", progress=False)
    got = open_ensemble(path).load()
    assert got.attrs["fastgen_status"] == "complete"
    xr.testing.assert_identical(got, open_ensemble(reference).load())
    xr.testing.assert_allclose(got.drop_attrs(), ensemble(member_sampler).compute().drop_attrs(), rtol=0, atol=0)

    again = Counting(member_sampler)
    write_ensemble(ensemble(again), path, progress=False)
    assert again.calls == []  # a finished store is left as it is


def test_crash_inside_a_block_write_leaves_that_block_unfinished(member_sampler, tmp_path, monkeypatch):
    path, to_zarr, writes = tmp_path / "ens.zarr", xr.Dataset.to_zarr, []

    def crash_on_third_region(self, *args, **kwargs):
        if kwargs.get("region") is not None:
            writes.append(1)
            if len(writes) == 3:
                to_zarr(self[VARS[:1]], *args, **kwargs)  # one variable of the block lands, then the crash
                raise OSError("killed mid-block")
        return to_zarr(self, *args, **kwargs)

    monkeypatch.setattr(xr.Dataset, "to_zarr", crash_on_third_region)
    with pytest.raises(OSError, match="mid-block"):
        write_ensemble(ensemble(member_sampler), path, progress=False)
    monkeypatch.setattr(xr.Dataset, "to_zarr", to_zarr)
    assert len(os.listdir(path / ".fastgen" / "blocks")) == 2  # the half-written block is not marked
    s = Counting(member_sampler)
    write_ensemble(ensemble(s), path, progress=False)
    assert len(s.calls) == 7
    xr.testing.assert_allclose(open_ensemble(path).load().drop_attrs(),
                               ensemble(member_sampler).compute().drop_attrs(), rtol=0, atol=0)


def test_incomplete_and_mismatched_stores_are_refused(member_sampler, tmp_path):
    path = tmp_path / "ens.zarr"
    with pytest.raises(RuntimeError):
        write_ensemble(ensemble(Counting(member_sampler, fail_at=5)), path, progress=False)
    with pytest.raises(EnsembleStoreError, match=r"incomplete ensemble \(4 of 9 blocks written\).*resume=True"):
        open_ensemble(path)

    s = Counting(member_sampler)
    with pytest.raises(EnsembleStoreError, match=r"attribute seed: store has 7, this run has 8"):
        write_ensemble(ensemble(s, seed=8), path, progress=False)
    with pytest.raises(EnsembleStoreError, match=r"chunks \(4, 2, 4, 5\), this run has .*chunks \(5, 3, 4, 5\)"):
        write_ensemble(ensemble(s, chunks=(3, 5)), path, progress=False)
    assert s.calls == [] and len(os.listdir(path / ".fastgen" / "blocks")) == 4  # nothing touched

    write_ensemble(ensemble(s, seed=8), path, resume=False, progress=False)  # start over
    assert len(s.calls) == 9 and open_ensemble(path).attrs["seed"] == 8

    foreign = tmp_path / "notes.zarr"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(EnsembleStoreError, match="not a readable Zarr store"):
        write_ensemble(ensemble(s), foreign, progress=False)
    with pytest.raises(EnsembleStoreError, match="will not delete"):
        write_ensemble(ensemble(s), foreign, resume=False, progress=False)
    assert (foreign / "keep.txt").read_text() == "mine"


def test_netcdf_appears_only_when_complete(member_sampler, tmp_path):
    path, sidecar = tmp_path / "ens.nc", tmp_path / "ens.nc.partial.zarr"
    with pytest.raises(RuntimeError):
        write_ensemble(ensemble(Counting(member_sampler, fail_at=3)), path, progress=False)
    assert not path.exists() and sidecar.exists()
    with pytest.raises(EnsembleStoreError, match=r"not written yet.*2 of 9 blocks.*resume=True"):
        open_ensemble(path)

    def layout(ds, p, fail=False):  # a domain's own layout: members as 'ensemble' in group 'prediction'
        ds.rename(member="ensemble").to_netcdf(p, group="prediction")
        if fail:
            raise OSError("disk full")

    s = Counting(member_sampler)
    with pytest.raises(OSError, match="disk full"):
        write_ensemble(ensemble(s), path, to_netcdf=lambda ds, p: layout(ds, p, fail=True), progress=False)
    assert len(s.calls) == 7 and not path.exists()  # a failed conversion leaves no final file
    s.calls.clear()
    write_ensemble(ensemble(s), path, to_netcdf=layout, progress=False)
    assert s.calls == []  # the complete sidecar is converted, not resampled
    assert path.exists() and not sidecar.exists() and not (tmp_path / "ens.nc.tmp").exists()
    want = ensemble(member_sampler).compute()
    with xr.open_dataset(path, group="prediction") as got:
        for v in VARS:
            np.testing.assert_array_equal(got[v].transpose("ensemble", "time", "y", "x").values, want[v].values)
        assert got.attrs["seed"] == 7 and got.attrs["fastgen_status"] == "complete"

    default = write_ensemble(ensemble(member_sampler), tmp_path / "plain.nc", progress=False)
    with open_ensemble(default) as got:
        xr.testing.assert_allclose(got.drop_attrs(), want.drop_attrs(), rtol=0, atol=0)
    again = Counting(member_sampler)
    write_ensemble(ensemble(again), default, progress=False)
    assert again.calls == []  # same run, finished file: nothing to do
    with pytest.raises(EnsembleStoreError, match="not written by this run"):
        write_ensemble(ensemble(again, seed=8), default, progress=False)
    bad = ensemble(again).assign_attrs(notes={"a": 1})
    with pytest.raises(ValueError, match="attribute 'notes'.*cannot be stored in netCDF"):
        write_ensemble(bad, tmp_path / "bad.nc", progress=False)
    assert again.calls == [] and not (tmp_path / "bad.nc.partial.zarr").exists()  # refused before sampling


def test_writer_holds_one_block_at_a_time(tmp_path):
    cases, members, chunks, shape = 8, 40, (2, 10), (64, 64)
    sizes = []

    def sample_block(case_ids, member_ids):  # [Nc, Nm, 2, 64, 64]
        sizes.append((len(case_ids), len(member_ids)))
        x = case_ids[:, None] * 1000.0 + member_ids[None, :]
        return np.broadcast_to(x[:, :, None, None, None], (*x.shape, 2, *shape)).astype(np.float32)

    ds = generate_ensemble(sample_block, cases=cases, members=members, variables=["a", "b"], shape=shape,
                           chunks=chunks)
    whole = cases * members * 2 * np.prod(shape) * 4  # 10.5 MB
    tracemalloc.start()
    try:
        write_ensemble(ds, tmp_path / "big.zarr", progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(sizes) == 16 and max(sizes) == chunks
    print(f"peak {peak / 1e6:.2f} MB")
    assert peak < whole / 3, f"writer peak {peak / 1e6:.1f} MB for a {whole / 1e6:.1f} MB ensemble"
    got = open_ensemble(tmp_path / "big.zarr")
    assert float(got["b"].isel(member=37, time=5, y=3, x=9)) == 5037.0
