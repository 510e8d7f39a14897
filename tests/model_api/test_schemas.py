"""Request schemas of both protocols, without a server."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from model_api.protocols.kserve import InferenceRequest
from model_api.protocols.openai import EmbeddingRequest


@pytest.mark.parametrize("given", ["text", ["a", "b"], [101, 102], [[101], [101, 7592, 102]], []])
def test_embedding_inputs_in_every_accepted_form(given: Any) -> None:
    assert EmbeddingRequest.model_validate({"input": given}).input == given


@pytest.mark.parametrize(
    "given", [3, None, ["a", 1], [True, False], [[1, "a"]], [1.5], {"text": "a"}, [["a"]]]
)
def test_embedding_inputs_of_no_accepted_form_get_one_readable_error(given: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        EmbeddingRequest.model_validate({"input": given})
    errors = caught.value.errors()
    assert len(errors) == 1
    assert errors[0]["loc"] == ("input",)
    assert "a list of token ids" in errors[0]["msg"]


def test_embedding_request_defaults_and_unknown_fields() -> None:
    request = EmbeddingRequest.model_validate({"input": "a", "temperature": 3})
    assert (request.model, request.encoding_format, request.dimensions) == (None, "float", None)
    with pytest.raises(ValidationError):
        EmbeddingRequest.model_validate({"input": "a", "dimensions": 0})


def test_inference_request_needs_inputs_with_name_shape_datatype_and_data() -> None:
    tensor = {"name": "pixels", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}
    request = InferenceRequest.model_validate({"id": "7", "inputs": [tensor], "outputs": [{"name": "label"}]})
    assert request.inputs[0].name == "pixels" and request.outputs is not None
    for missing in ("name", "shape", "datatype", "data"):
        with pytest.raises(ValidationError):
            InferenceRequest.model_validate({"inputs": [{k: v for k, v in tensor.items() if k != missing}]})
    with pytest.raises(ValidationError):
        InferenceRequest.model_validate({"id": "no inputs"})
