"""Wire schemas shared by the worker and the gateway.

Field names, defaults and shapes follow text-embeddings-inference 1.x (and OpenAI's embeddings
API for ``/v1/embeddings``) so that existing clients work unchanged. Types are strict: a number
where a string belongs is a validation error, never silently coerced.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Response
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

from embedfleet.api.errors import STATUS
from embedfleet.engine.errors import ErrorKind
from embedfleet.engine.tokenization import TruncationDirection

TokenId = Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]
Dimensions = Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]
"""Bounded like every integer we forward: a number beyond 64 bits cannot even be serialised again."""
InputType = StrictStr | list[TokenId]
"""One input: a text, or a sequence of token ids that is used as is."""
Input = InputType | list[InputType]
"""A single input or a batch of them."""


class _Request(BaseModel):
    # TEI ignores fields it does not know; so do we, so newer clients keep working.
    model_config = ConfigDict(extra="ignore")


class _Truncation(_Request):
    truncate: StrictBool | None = Field(
        default=None, description="Cut inputs longer than the model's maximum instead of failing."
    )
    truncation_direction: TruncationDirection = TruncationDirection.RIGHT


class EmbedRequest(_Truncation):
    """POST /embed: pooled embeddings."""

    inputs: Input
    normalize: StrictBool = True
    prompt_name: StrictStr | None = None
    dimensions: Dimensions | None = Field(
        default=None, description="Keep the first N dimensions (Matryoshka), renormalised if normalize."
    )


class EmbedAllRequest(_Truncation):
    """POST /embed_all: one vector per token."""

    inputs: Input
    prompt_name: StrictStr | None = None


class EmbedSparseRequest(_Truncation):
    """POST /embed_sparse: SPLADE sparse vectors."""

    inputs: Input
    prompt_name: StrictStr | None = None


class RerankRequest(_Truncation):
    """POST /rerank: score each text against the query."""

    query: StrictStr
    texts: list[StrictStr]
    raw_scores: StrictBool = False
    return_text: StrictBool = False


PredictInput = StrictStr | list[StrictStr] | list[list[StrictStr]]


class PredictRequest(_Truncation):
    """POST /predict: classify a text, a pair, or a batch of texts and pairs."""

    inputs: PredictInput
    raw_scores: StrictBool = False


class SimilarityInput(_Request):
    """The texts of a /similarity request."""

    source_sentence: StrictStr
    sentences: list[StrictStr]


class SimilarityParameters(_Truncation):
    """Options of a /similarity request."""

    prompt_name: StrictStr | None = None


class SimilarityRequest(_Request):
    """POST /similarity: cosine similarity of each sentence to the source sentence."""

    inputs: SimilarityInput
    parameters: SimilarityParameters | None = None


class TokenizeRequest(_Request):
    """POST /tokenize."""

    inputs: StrictStr | list[StrictStr]
    add_special_tokens: StrictBool = True
    prompt_name: StrictStr | None = None


class DecodeRequest(_Request):
    """POST /decode."""

    ids: list[TokenId] | list[list[TokenId]]
    skip_special_tokens: StrictBool = True


class OpenAIEmbeddingRequest(_Request):
    """POST /v1/embeddings, as OpenAI's embeddings API."""

    input: Input
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Dimensions | None = None
    user: StrictStr | None = None

    @field_validator("encoding_format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


# ----- responses (used for the OpenAPI document; handlers serialise with orjson) -----


class SparseValue(BaseModel):
    """One non-zero entry of a sparse vector."""

    index: int
    value: float


class Rank(BaseModel):
    """One reranked text."""

    index: int
    score: float
    text: str | None = None


class Prediction(BaseModel):
    """One class score."""

    score: float
    label: str


class SimpleToken(BaseModel):
    """One token of a /tokenize response; start/stop are character offsets."""

    id: int
    text: str
    special: bool
    start: int | None = None
    stop: int | None = None


class OpenAIEmbedding(BaseModel):
    """One embedding of an OpenAI-style response."""

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class OpenAIUsage(BaseModel):
    """Token counts of an OpenAI-style response."""

    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingResponse(BaseModel):
    """POST /v1/embeddings response."""

    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


class ClassifierModel(BaseModel):
    """Labels of a classifier or reranker."""

    id2label: dict[str, str]
    label2id: dict[str, int]


class EmbeddingModel(BaseModel):
    """Pooling of an embedding model."""

    pooling: str


class Info(BaseModel):
    """GET /info."""

    model_id: str
    model_sha: str | None
    model_dtype: str
    model_type: dict[str, Any]
    served_model_name: str
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None
    max_client_batch_size: int
    auto_truncate: bool
    tokenization_workers: int
    version: str
    sha: str | None = None
    docker_label: str | None = None
    # embedfleet extensions: what a gateway needs to fingerprint the model and size its batches.
    task: str
    pooling: str | None
    dimension: int
    backend: str
    device: str
    quantization: str | None = None
    backend_selection: str = Field("", description="what chose the backend and dtype, and why (--dtype auto)")
    inference_streams: int = Field(1, description="batches the backend runs at once")
    revision: str | None = None


class ErrorResponse(BaseModel):
    """TEI's error body."""

    error: str
    error_type: str


class OpenAIErrorResponse(BaseModel):
    """The error body of the OpenAI-compatible routes."""

    message: str
    code: int
    error_type: str


ERROR_STATUSES = sorted({STATUS[kind] for kind in ErrorKind} | {413})
"""The statuses a model route can answer with besides 200 (the engine's errors and the body limit)."""
TEI_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in ERROR_STATUSES}
"""The error responses of a TEI route, for the OpenAPI document (the worker's and the gateway's)."""
OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": OpenAIErrorResponse} for code in ERROR_STATUSES}
"""The error responses of an OpenAI route."""
HEALTH: dict[str, Any] = {"response_class": Response, "responses": {503: {"model": ErrorResponse}}}
"""/health's route options: an empty 200 (no content type), or 503 with the reason."""
METRICS: dict[str, Any] = {"response_class": PlainTextResponse}
"""/metrics' route options: Prometheus text."""
