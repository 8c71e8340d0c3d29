"""Response models: what each endpoint returns, as /docs shows it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Prediction(BaseModel):
    """One image's prediction (the fields of ``pneumoscan predict``'s results, without file paths)."""

    request_id: str = Field(description="also in the X-Request-ID header and the audit log")
    prediction: str = Field(description="NORMAL or PNEUMONIA, at the model's operating threshold")
    confidence: float = Field(description="probability of the predicted class")
    probabilities: dict[str, float] = Field(description="calibrated probability of each class")
    risk_level: Literal["LOW", "MEDIUM", "HIGH"]
    uncertainty: float = Field(description="entropy of the probabilities / ln 2: 0 certain, 1 a coin toss")
    processing_time: float = Field(description="seconds of decoding and model time for this image")
    timestamp: str = Field(description="when the prediction was made (ISO 8601)")
    warnings: list[str] = Field(description="reasons to read the prediction with caution, e.g. a lateral view")
    model_version: str
    threshold: float = Field(description="operating threshold on P(PNEUMONIA)")
    calibrated: bool = Field(description="whether the probabilities are calibrated (temperature; a site's intercept)")
    view_position: str | None = Field(None, description="DICOM ViewPosition when it is a defined term (PA, AP, LL, "
                                                       "...); 'unrecognised' for any other text, which is never "
                                                       "echoed; null when absent or not DICOM")
    input_sha256: str = Field(description="SHA-256 of the uploaded image, as the audit log records it")
    heatmap: str | None = Field(None, description="with ?heatmap=true: Grad-CAM overlay of the predicted class, "
                                                  "a PNG data URI")


class Error(BaseModel):
    """Every error: what went wrong, its kind, and the request to look up in the audit log."""

    error: str
    error_type: str = Field(description="ImageError, OutOfScopeError, UploadTooLarge, NoFile, BadRequest, "
                                        "Unauthorized, NotFound, MethodNotAllowed, Overloaded, NotReady, "
                                        "AuditError or InternalError")
    request_id: str


class ModelInfo(BaseModel):
    """The model behind the predictions, what it is for, and how it measured."""

    model_version: str
    arch: str | None
    image_size: int
    intensity: str = Field("raw", description="the input's grey levels: raw, or equalize (per film, by rank)")
    class_names: list[str]
    threshold: float
    temperature: float | None
    calibrated: bool
    out_of_scope_gate: bool
    intended_use: str
    notice: str
    validation_metrics: dict[str, float] = Field(
        description="the checkpoint's own figures on its validation split at its threshold (MODEL_CARD.md)")
    training_note: str | None
    backend: str | None = Field(None, description="what runs the model: torch, onnx or onnx-int8")
    detail_check: bool = Field(False, description="whether downscaled or blurred copies get a low-detail warning")
    calibration_bias: float = Field(0.0, description="the calibration's intercept b, P = sigmoid(z / temperature + "
                                                     "b); 0 except for a site calibrated with --intercept")
    max_upload_mb: float
    workers: int


class Health(BaseModel):
    status: str
    model_version: str | None = None
