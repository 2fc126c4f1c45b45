"""Settings of the service, read from ``JRS_*`` environment variables and an optional ``.env``.

Example::

    JRS_API_KEYS=key-one,key-two          # or JRS_API_KEYS_FILE=/run/secrets/jrs-keys (one a line)
    JRS_DATA_DIR=/var/lib/jrs             # artefacts (jobs/<id>/) and the SQLite job store
    JRS_MAX_CONCURRENT_JOBS=2
    JRS_QUEUE_SIZE=8
    JRS_SYNONYMS=/etc/jrs/synonyms.yaml   # the site's ROI names (as ``jrs ... --synonyms FILE``)
    JRS_PATH_CHOICE=prostate=fusion       # output path per organ (as ``jrs ... --path-choice``)

The service refuses to start without at least one API key unless ``JRS_INSECURE_DEV=1``, and with
a synonym file it cannot read or that is not a valid synonym table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Request
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from jrs.core.errors import JrsError
from jrs.core.labels import SynonymTable
from jrs.pipeline.options import parse_path_choice
from jrs.service.errors import ConfigurationError

MIB = 1024 * 1024


class Settings(BaseSettings):
    """Service configuration (environment prefix ``JRS_``).

    Attributes:
        api_keys: accepted Bearer keys (``JRS_API_KEYS``, comma-separated).
        api_keys_file: file with more keys, one a line, ``#`` comments allowed.
        insecure_dev: allow starting without any key (every request is then accepted).
        public_docs: serve ``/docs`` and ``/openapi.json`` without a key (they hold no data).
        data_dir: folder of the job store (``jobs.sqlite3``) and the job folders (``jobs/<id>/``).
        model_dir: a model version folder (``models/<name>/<version>`` with ``model.onnx``) or
            the root of such folders (the pipeline then uses the newest version).
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        engine: network engine (``JRS_ENGINE``): ``auto`` (ONNX Runtime on CUDA, else OpenVINO
            on the CPU where installed, else ONNX Runtime), ``onnxruntime`` or ``openvino``. The
            model is compiled once at start-up and kept for every job.
        precision: network arithmetic (``JRS_PRECISION``): ``auto`` (bf16 with OpenVINO on a
            CPU with AMX/AVX512-BF16, else fp32), ``fp32``, ``bf16`` or ``fp16`` (TensorRT).
        margin_mm: margin around the pre-aligned planning organs of the network box, mm
            (`jrs.pipeline.options.RecontourOptions.margin_mm`).
        dvf_spacing_mm: spacing (mm) of the grid ``dvf.mha`` and ``registration.dcm`` are
            written on (over the daily CT; an axis whose CT spacing is coarser keeps the CT's):
            3 mm by default, about 25 MB per file for a 174 x 512 x 512 daily CT where its own
            grid gives 550 MB; 0: the daily CT grid itself.
        poll_after_s: ``Retry-After`` of 202 answers (when to poll the job again).
        max_upload_bytes: largest request body (both fields together).
        max_files: most files in one request plus inside its zips.
        max_zip_entries: most entries of one zip archive.
        max_compression_ratio: largest uncompressed/compressed ratio of a zip entry or archive.
        max_extracted_bytes: largest total uncompressed size of the zips of one request.
        max_voxels: largest CT series accepted, slices x rows x columns as the headers declare
            (2**29: a 512 x 512 series of 2048 slices; bounds the memory of reading it).
        min_free_bytes: new uploads are refused with 507 while the data folder has less free
            space than this.
        max_concurrent_jobs: worker threads running jobs.
        max_concurrent_validations: uploads unpacked and read with `jrs.io` at the same time
            (bounds the memory of reading CT series).
        queue_size: jobs that may wait for a worker; more are refused with 503.
        job_wait_timeout_s: longest ``wait=true`` waits before answering 202.
        max_wait_timeout_s: upper bound of a client's ``timeout`` query value.
        retry_after_s: ``Retry-After`` of 503 answers.
        retention_days: finished jobs older than this are deleted (rows and folders).
        cleanup_interval_s: how often the retention cleanup runs.
        shutdown_grace_s: how long shutdown waits for running jobs before marking them failed.
        requeue_on_restart: re-queue jobs a previous process left running (else mark failed).
        max_attempts: a job interrupted this many times is marked failed instead of re-queued.
        keep_inputs: keep the uploaded DICOM of finished jobs (deleted by default).
        log_level: level of the JSON logs.
        adaptation: patient-specific adaptation of ``/v1/patients`` (docs/adaptation.md):
            ``auto`` (run ``jrs adapt`` in a subprocess where torch is installed, else the
            patient says it is unavailable), ``local`` (the same, required), ``external`` (an
            adaptation worker, ``python -m jrs.service.patients``, on the same data folder) or
            ``off``.
        adapt_minutes: time budget of one adaptation, minutes (``jrs adapt --minutes``).
        adapt_base_dir: model adapted (default: the served model, ``model_dir``).
        adapt_args: more ``jrs adapt`` options, e.g. ``--fractions 8 --threads 8``.
        patient_retention_days: a patient (planning, model) unused for this long is deleted.
        synonyms: the site's ROI-name synonym table (``JRS_SYNONYMS``, a YAML file as for
            ``jrs recontour --synonyms FILE``: ``{organ_key: [names...]}``, extending the built-in
            table), loaded once at start-up; every job, every patient's planning check and every
            adaptation uses it. A file that cannot be read or is not a valid table stops the
            start-up with an error naming it.
        path_choice: the site's output path per organ (``JRS_PATH_CHOICE``, ``ORGAN=PATH``
            items, comma-separated, as ``jrs recontour --path-choice``: e.g.
            ``all=registration,prostate=fusion``); organs not named keep the model's validated
            choice. Every job and every patient fraction uses it; an invalid item stops the
            start-up with an error naming it.
    """

    model_config = SettingsConfigDict(
        env_prefix="JRS_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False)
    api_keys_file: Path | None = None
    insecure_dev: bool = False
    public_docs: bool = True
    data_dir: Path = Path("jrs-data")
    model_dir: Path | None = None
    device: str = "auto"
    engine: Literal["auto", "onnxruntime", "openvino"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    margin_mm: float = Field(default=30.0, ge=0, le=200)
    dvf_spacing_mm: float = Field(default=3.0, ge=0, le=20)
    poll_after_s: int = Field(default=5, ge=1)
    max_upload_bytes: int = Field(default=2048 * MIB, gt=0)
    max_files: int = Field(default=4000, gt=0)
    max_zip_entries: int = Field(default=4000, gt=0)
    max_compression_ratio: float = Field(default=100.0, gt=1.0)
    max_extracted_bytes: int = Field(default=4096 * MIB, gt=0)
    max_voxels: int = Field(default=2**29, gt=0)
    min_free_bytes: int = Field(default=512 * MIB, ge=0)
    max_concurrent_jobs: int = Field(default=1, ge=1)
    max_concurrent_validations: int = Field(default=2, ge=1)
    queue_size: int = Field(default=8, ge=0)
    job_wait_timeout_s: float = Field(default=120.0, ge=0)
    max_wait_timeout_s: float = Field(default=600.0, ge=0)
    retry_after_s: int = Field(default=10, ge=1)
    retention_days: float = Field(default=7.0, gt=0)
    cleanup_interval_s: float = Field(default=3600.0, gt=0)
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    requeue_on_restart: bool = True
    max_attempts: int = Field(default=2, ge=1)
    keep_inputs: bool = False
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    adaptation: Literal["auto", "local", "external", "off"] = "auto"
    adapt_minutes: float = Field(default=15.0, gt=0, le=600)
    adapt_base_dir: Path | None = None
    adapt_args: str = ""
    patient_retention_days: float = Field(default=30.0, gt=0)
    synonyms: Path | None = None
    _synonym_table: Any = PrivateAttr(default=None)
    path_choice: str = ""
    _path_choice: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("engine", "precision", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        v = value.strip().lower()
        if v not in ("auto", "cpu", "cuda") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError(f"JRS_DEVICE must be auto, cpu, cuda or cuda:N, got {value!r}")
        return v

    @model_validator(mode="after")
    def _load_keys(self) -> Settings:
        if self.api_keys_file is not None:
            try:
                text = self.api_keys_file.read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(
                    f"JRS_API_KEYS_FILE {self.api_keys_file} cannot be read ({exc.strerror})"
                ) from exc
            extra = [
                line.strip()
                for line in text.splitlines()
                if line.strip() and not line.strip().startswith("#")
            ]
            self.api_keys = list(dict.fromkeys([*self.api_keys, *extra]))
        if not self.api_keys and not self.insecure_dev:
            raise ValueError(
                "no API key configured: set JRS_API_KEYS (comma-separated) or JRS_API_KEYS_FILE "
                "(one key a line); for local development only, JRS_INSECURE_DEV=1 starts without "
                "authentication"
            )
        return self

    @model_validator(mode="after")
    def _load_synonyms(self) -> Settings:
        if self.synonyms is None:
            return self

        try:
            self._synonym_table = SynonymTable.from_yaml(self.synonyms)
        except JrsError as exc:
            detail = str(exc).removeprefix(f"{self.synonyms}: ")
            raise ValueError(
                f"JRS_SYNONYMS: the synonym file {self.synonyms} is not usable: {detail} (format: "
                "a YAML mapping of organ keys to lists of ROI names, e.g. 'prostate: [CTVp]')"
            ) from exc
        return self

    @model_validator(mode="after")
    def _parse_path_choice(self) -> Settings:
        if not self.path_choice.strip():
            return self

        try:
            self._path_choice = parse_path_choice([self.path_choice], "JRS_PATH_CHOICE item")
        except JrsError as exc:
            raise ValueError(str(exc)) from exc
        return self

    @property
    def path_choices(self) -> dict[str, str]:
        """Organ key -> path of ``JRS_PATH_CHOICE`` (empty: the model's choice everywhere)."""
        return dict(self._path_choice)

    @property
    def synonym_table(self) -> Any:
        """The `jrs.core.labels.SynonymTable` of ``JRS_SYNONYMS`` (None: the built-in table)."""
        return self._synonym_table

    @property
    def db_path(self) -> Path:
        """The SQLite job store."""
        return self.data_dir / "jobs.sqlite3"

    @property
    def jobs_dir(self) -> Path:
        """The folder holding one folder per job."""
        return self.data_dir / "jobs"


def load_settings(**overrides: Any) -> Settings:
    """Read the settings from the environment (and ``.env``), with explicit overrides.

    Args:
        **overrides: field values taking precedence over the environment.

    Returns:
        The validated settings.

    Raises:
        ConfigurationError: a missing or invalid setting (the message names the variable).
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()))
            msg = str(err.get("msg", "")).removeprefix("Value error, ")
            parts.append(f"JRS_{loc.upper()}: {msg}" if loc else msg)
        raise ConfigurationError("invalid service settings: " + "; ".join(parts)) from None


def get_settings(request: Request) -> Settings:
    """FastAPI dependency: the settings of the running app.

    Args:
        request: the current request.

    Returns:
        The `Settings` the app was created with.
    """
    settings: Settings = request.app.state.settings
    return settings
