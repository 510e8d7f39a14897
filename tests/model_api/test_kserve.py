"""The Open Inference Protocol (KServe v2) on the real server: metadata, health, inference."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import requests

from model_api.models.example import digits_split
from tests.model_api.conftest import LIMITS, Server

MODEL = "all-MiniLM-L6-v2"


def infer(client: requests.Session, server: Server, model: str, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(f"{server.url}/v2/models/{model}/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def pixels_input(rows: np.ndarray) -> dict[str, Any]:
    return {
        "name": "pixels",
        "datatype": "FP32",
        "shape": list(rows.shape),
        "data": rows.reshape(-1).tolist(),
    }


def test_server_metadata_and_health(client: requests.Session, server: Server) -> None:
    assert client.get(f"{server.url}/v2").json() == {
        "name": "model-api",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data"],
    }
    assert client.get(f"{server.url}/v2/health/live").json() == {"live": True}
    assert client.get(f"{server.url}/v2/health/ready").json() == {"ready": True}
    for name in (MODEL, "digits"):
        ready = client.get(f"{server.url}/v2/models/{name}/ready")
        assert ready.status_code == 200 and ready.json() == {"name": name, "ready": True}


def test_tensor_metadata_comes_from_the_exported_file(client: requests.Session, server: Server) -> None:
    metadata = client.get(f"{server.url}/v2/models/digits").json()
    assert metadata["name"] == "digits"
    assert metadata["platform"] == "pytorch_torch_export"
    assert metadata["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    assert metadata["outputs"] == [
        {"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "label", "datatype": "INT64", "shape": [-1]},
    ]
    assert metadata["max_batch_size"] == 16
    assert len(metadata["versions"]) == 1 and re.fullmatch(r"[0-9a-f]{16}", metadata["versions"][0])


def test_the_embedding_model_is_a_bytes_in_fp32_out_model(client: requests.Session, server: Server) -> None:
    metadata = client.get(f"{server.url}/v2/models/{MODEL}").json()
    assert metadata["platform"] == "sentence_transformers"
    assert metadata["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert metadata["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]
    assert metadata["max_batch_size"] == 16


def test_the_digits_model_reads_held_out_digits(client: requests.Session, server: Server) -> None:
    split = digits_split()
    predicted: list[int] = []
    chunk = LIMITS["max_inputs"]
    for start in range(0, len(split.test_pixels), chunk):
        rows = split.test_pixels[start : start + chunk]
        result = infer(client, server, "digits", {"inputs": [pixels_input(rows)]})
        outputs = {output["name"]: output for output in result["outputs"]}
        assert outputs["label"]["datatype"] == "INT64" and outputs["label"]["shape"] == [len(rows)]
        assert outputs["logits"]["shape"] == [len(rows), 10]
        logits = np.asarray(outputs["logits"]["data"]).reshape(len(rows), 10)
        assert outputs["label"]["data"] == logits.argmax(axis=1).tolist()
        predicted.extend(outputs["label"]["data"])
    accuracy = float(np.mean(np.asarray(predicted) == split.test_labels))
    assert len(predicted) == len(split.test_labels) == 450
    assert accuracy >= 0.9, accuracy


def test_the_response_names_model_version_and_request_id(client: requests.Session, server: Server) -> None:
    metadata = client.get(f"{server.url}/v2/models/digits").json()
    rows = digits_split().test_pixels[:2]
    result = infer(client, server, "digits", {"id": "request-7", "inputs": [pixels_input(rows)]})
    assert result["model_name"] == "digits"
    assert result["model_version"] == metadata["versions"][0]
    assert result["id"] == "request-7"


def test_outputs_can_be_chosen_and_nested_data_is_read(client: requests.Session, server: Server) -> None:
    rows = digits_split().test_pixels[:3]
    nested = {"name": "pixels", "datatype": "FP32", "shape": [3, 64], "data": rows.tolist()}
    result = infer(client, server, "digits", {"inputs": [nested], "outputs": [{"name": "label"}]})
    assert [output["name"] for output in result["outputs"]] == ["label"]
    flat = infer(client, server, "digits", {"inputs": [pixels_input(rows)]})
    assert result["outputs"][0]["data"] == next(o["data"] for o in flat["outputs"] if o["name"] == "label")


def test_the_versioned_routes_answer_for_the_current_version(
    client: requests.Session, server: Server
) -> None:
    version = client.get(f"{server.url}/v2/models/digits").json()["versions"][0]
    base = f"{server.url}/v2/models/digits/versions/{version}"
    assert client.get(base).json()["versions"] == [version]
    assert client.get(f"{base}/ready").json()["ready"] is True
    rows = digits_split().test_pixels[:1]
    response = client.post(f"{base}/infer", json={"inputs": [pixels_input(rows)]})
    assert response.status_code == 200 and response.json()["model_version"] == version


def test_texts_through_kserve_embed_as_through_openai(client: requests.Session, server: Server) -> None:
    texts = ["first text", "second, longer text for the same batch"]
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": texts}]}
    output = infer(client, server, MODEL, body)["outputs"][0]
    assert output["name"] == "embedding" and output["datatype"] == "FP32" and output["shape"] == [2, 384]
    openai = client.post(f"{server.url}/v1/embeddings", json={"input": texts, "model": MODEL}).json()
    expected = np.asarray([item["embedding"] for item in openai["data"]])
    assert np.allclose(np.asarray(output["data"]).reshape(2, 384), expected, atol=1e-6)
