"""`qrelay jobs result` reads results off the wire without Qiskit; here its reading is
checked against Qiskit's own containers, encoded by the executor's codec."""

from __future__ import annotations

import json
import math

import numpy as np
from qiskit.primitives import PrimitiveResult, PubResult, SamplerPubResult
from qiskit.primitives.containers import BitArray, DataBin
from rich.console import Console

from qrelay._proto.v1 import jobs_pb2, types_pb2
from qrelay.cli._results import print_summary, result_document
from qrelay.codec import encode_primitive_result


def wire(result: PrimitiveResult[PubResult]) -> types_pb2.JobResult:
    return types_pb2.JobResult(primitive=encode_primitive_result(result))


def job(kind: int = types_pb2.JOB_KIND_SAMPLER) -> jobs_pb2.Job:
    return jobs_pb2.Job(id="j-1", kind=kind, backend="aer")  # type: ignore[arg-type]


def test_counts_equal_qiskits_for_wide_registers_and_a_shaped_pub() -> None:
    rng = np.random.default_rng(7)
    # 11 bits (two bytes, the top five bits of the first padding), shape (2, 3), 50 shots.
    raw = rng.integers(0, 2**11, size=(2, 3, 50))
    bits = BitArray.from_samples(raw.reshape(-1).tolist(), num_bits=11)
    packed = bits.array.reshape(2, 3, 50, -1)
    shaped = BitArray(packed, 11)
    meas = BitArray.from_counts({"101": 3, "000": 5})
    pub = SamplerPubResult(DataBin(shape=(2, 3), wide=shaped), metadata={"shots": 50})
    flat = SamplerPubResult(DataBin(meas=meas), metadata={})
    doc = result_document(job(), wire(PrimitiveResult([pub, flat], metadata={"v": 2})))
    wide = doc["pubs"][0]["data"]["wide"]
    assert wide["shape"] == [2, 3]
    assert wide["num_bits"] == 11
    assert wide["num_shots"] == 50
    assert wide["counts"] == shaped.get_counts()
    assert list(wide["counts"].values()) == sorted(wide["counts"].values(), reverse=True)
    assert doc["pubs"][1]["data"]["meas"]["counts"] == {"000": 5, "101": 3}
    assert doc["pubs"][0]["shape"] == [2, 3]
    assert doc["metadata"] == {"v": 2}
    json.dumps(doc, allow_nan=False)  # strict JSON


def test_arrays_keep_shape_dtype_and_become_strict_json() -> None:
    evs = np.array([[0.5, math.nan], [math.inf, -math.inf]])
    stds = np.array(0.25)
    phases = np.array([1 + 2j, -0.5j])
    flags = np.array([True, False])
    data = DataBin(evs=evs, stds=stds, phases=phases, flags=flags)
    doc = result_document(
        job(types_pb2.JOB_KIND_ESTIMATOR),
        wire(PrimitiveResult([PubResult(data, metadata={"precision": 0.1})])),
    )
    fields = doc["pubs"][0]["data"]
    assert doc["kind"] == "estimator"
    assert fields["evs"] == {
        "kind": "array",
        "shape": [2, 2],
        "dtype": "<f8",
        "values": [[0.5, "NaN"], ["Infinity", "-Infinity"]],
    }
    assert fields["stds"]["shape"] == []
    assert fields["stds"]["values"] == 0.25
    assert fields["phases"]["values"] == [[1.0, 2.0], [-0.0, -0.5]]
    assert fields["flags"]["values"] == [True, False]
    assert doc["pubs"][0]["metadata"] == {"precision": 0.1}
    text = json.dumps(doc, allow_nan=False)
    assert json.loads(text) == doc


def test_the_human_summary_shows_top_counts_values_and_metadata() -> None:
    counts = {format(i, "04b"): 100 - i for i in range(12)}
    meas = BitArray.from_counts(counts)
    pub = SamplerPubResult(DataBin(meas=meas), metadata={"shots": sum(counts.values())})
    est = PubResult(DataBin(shape=(10,), evs=np.arange(10) / 10), metadata={})
    doc = result_document(job(), wire(PrimitiveResult([pub, est])))
    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    print_summary(doc, console)
    text = console.export_text()
    assert f"meas: {sum(counts.values())} shots, 4 bits" in text
    assert "0000: 100  0001: 99" in text
    assert "(+4 more)" in text  # 12 outcomes, 8 shown
    assert "evs: shape [10]: [0, 0.1, 0.2, 0.3, 0.4, 0.5, … (10 values)]" in text
    assert all(len(line) <= 80 for line in text.splitlines())


def test_a_program_result_is_its_json_value() -> None:
    result = types_pb2.JobResult(program_json=json.dumps({"energy": -1.5, "steps": [1, 2]}))
    doc = result_document(job(types_pb2.JOB_KIND_PROGRAM), result)
    assert doc == {
        "job_id": "j-1",
        "kind": "program",
        "backend": "aer",
        "value": {"energy": -1.5, "steps": [1, 2]},
    }
