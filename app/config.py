"""Settings: one place, one env prefix (`POLAR_`), nested groups (`POLAR_MODEL__NAME=...`)."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, PrivateAttr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ModelSettings(BaseModel):
    """Which CLIP serves the text and image towers."""

    name: str = Field("ViT-B-32", description="open_clip model name (or the demo model's name)")
    pretrained: str = Field(
        "openai", description="open_clip pretrained tag, or a path to a local checkpoint file"
    )
    checkpoint_tag: str = Field(
        "",
        description="for a local checkpoint file: the open_clip tag of the weights it holds "
        "(openai for OpenAI's ViT-B-32): sets their activation and Immich's model name "
        '(ViT-B-32__openai); empty = "pretrained" in polar.json beside the file, else the '
        "weights are undeclared and answer no Immich model",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks CUDA if present")
    cache_dir: Path | None = Field(None, description="where open_clip caches downloaded weights")
    fallback_to_demo: bool = Field(
        True, description="serve the bundled demo model (loudly) if the weights cannot be had"
    )
    preload: bool = Field(True, description="load the model at startup (else on first use)")
    onnx: bool = Field(
        True,
        description="run the image tower on ONNX Runtime where it is installed (the onnx extra: "
        "pip install 'polar-search[onnx]') and its vectors agree with PyTorch's within 1e-4 on a "
        "check batch; exported at first use into <data_dir>/onnx, one file per set of image "
        "weights; false = always PyTorch",
    )
    threads: int = Field(
        0,
        ge=0,
        description="torch CPU threads for work outside the groups of POLAR_THREADS__*; "
        "0 = torch's default (all cores)",
    )


class ThreadSettings(BaseModel):
    """CPU threads (torch, FAISS) per workload; 0 = the process default (POLAR_MODEL__THREADS)."""

    training: int = Field(
        1,
        ge=0,
        description="threads of a training job (tiny tensors: more threads wait on each other "
        "and stall on busy cores; bench/contention.py)",
    )
    embedding: int = Field(
        1,
        ge=0,
        description="threads of an image-embedding batch (2 threads stalled to 12-15x their idle "
        "time beside 2 busy processes on 2 cores; 0 = all cores, for a machine of its own)",
    )
    search: int = Field(
        1,
        ge=0,
        description="threads of one search (query encoding, FAISS); several searches run side "
        "by side (POLAR_THREADS__CONCURRENT_SEARCHES)",
    )
    concurrent_searches: int = Field(
        0,
        ge=0,
        description="searches (and query embeddings) one API process runs at once, once their "
        "request has arrived; more wait their turn in arrival order, holding no thread. Few at "
        "once keep the slowest searches near the typical one (bench/load.py); 0 = one per core",
    )
    job_yield_ms: float = Field(
        50.0,
        ge=0,
        description="a background job in the API process (embedded mode) pauses at each progress "
        "report while searches run, at most this long per pause; 0 = never",
    )


class TrainingSettings(BaseModel):
    """POLAR adapter training (docs/POLAR.md)."""

    lam: float | None = Field(
        None,
        description="λ regulariser on mean(B²); empty = 0 with the keep term, else the model's "
        "calibrated default",
    )
    keep_weight: float | None = Field(
        None,
        ge=0,
        description="weight of the keep term (texts without the concept keep their embedding); "
        "0 = the paper's objective; empty = the model's recipe (polar.json beside its "
        "checkpoint: 3.0 for the demo model; the paper's 0 for any other model)",
    )
    steps: int = Field(500, ge=1, le=20_000, description="full-batch Adam steps")
    lr: float | None = Field(
        None,
        gt=0,
        description="Adam learning rate; empty = the model's recipe (3e-3 for the demo model "
        "with its keep term; the paper's 1e-3 for any other model)",
    )
    seed: int = Field(0, description="fixed seed for the rank-1 init")
    token_mode: Literal["shared", "distinct"] = Field(
        "distinct", description="shared `sks` placeholder, or a distinct rare token per concept"
    )
    min_photos: int = Field(3, ge=1, description="fewest photos a concept accepts")
    max_photos: int = Field(13, ge=1, description="most photos a concept accepts")
    retention_max_drop: float = Field(
        0.03, ge=0, description="flag a concept whose update costs more general retrieval than this"
    )


class SearchSettings(BaseModel):
    """How a query that names concepts is encoded (bench/results/pervl_synthetic*.json)."""

    stack: Literal["embeddings", "parameters"] = Field(
        "embeddings",
        description="several concepts: sum of the query encoded under each update alone, or "
        "the paper's exact parameter sum V + Σ B_k Â_k",
    )
    photo_weight: float = Field(
        0.5, ge=0, description="weight of the concept's photo-embedding mean fused into the query"
    )
    multi_photo_weight: float = Field(
        1.5,
        ge=0,
        description="several concepts (stack=embeddings): weight of each concept's photo mean "
        "in its own part of the query",
    )
    multi_context_weight: float = Field(
        1.0,
        ge=0,
        description="several concepts (stack=embeddings): weight of the plain query added for "
        "the context",
    )
    regions: Literal["five", "none"] = Field(
        "five",
        description="crops embedded per image at index time to re-rank queries that name several "
        "concepts (five = four 60 % corners + centre, 6x the embedding work; none = off)",
    )
    region_method: Literal["auto", "crops", "pooled", "both", "late"] = Field(
        "auto",
        description="how the regions are embedded: crops = each crop encoded on its own (R more "
        "forward passes per image); pooled = each box pooled from the whole image's one forward "
        "pass (1.04x / 1.18x the cost of no regions on the demo model / ViT-B-32, against 4.7x / "
        "7.8x for crops); both = crops and pooled regions stored side by side, each matched on "
        "its own (about the cost of crops, twice the region storage); late = ViTs only: in the "
        "one forward pass each box gets its own CLS token attending to the box's patches, and the "
        "last block is re-run on the box's tokens (1.3x the time of no regions on ViT-B-32); "
        "auto = the method measured best for the image tower's family on the synthetic PerVL "
        "benchmark: both for ModifiedResNets (the demo model), late for ViTs, crops for others "
        "(docs/BENCHMARKS.md); a model a method cannot serve falls back to crops",
    )
    region_weight: float = Field(
        8.0,
        ge=0,
        description="queries naming several concepts: weight of the concepts' best crop matches "
        "in the re-ranking score (region_method crops or both)",
    )
    pooled_region_weight: float = Field(
        16.0,
        ge=0,
        description="queries naming several concepts: weight of the concepts' best pooled-region "
        "matches in the re-ranking score (region_method pooled or both)",
    )
    late_region_weight: float = Field(
        4.0,
        ge=0,
        description="queries naming several concepts: weight of the concepts' best late-region "
        "matches in the re-ranking score (region_method late; queries naming one concept are not "
        "re-ranked by late regions)",
    )
    concept_region_weight: float = Field(
        1.0,
        ge=0,
        description="queries naming one concept: weight of its best crop match in the "
        "re-ranking score, which finds photos where it fills only part of the frame "
        "(0 = not re-ranked)",
    )
    concept_only_photo_weight: float = Field(
        2.0,
        ge=0,
        description='a query that names one concept and nothing else ("Fido", "photos of '
        "my Fido\"): weight of the concept's photo mean fused into it",
    )
    concept_only_region_weight: float = Field(
        4.0,
        ge=0,
        description="such a concept-only query: weight of the best match between the concept's "
        "photo mean and a crop in the re-ranking score, so its look is found anywhere in the "
        "frame (0 = not re-ranked)",
    )
    region_candidates: int = Field(
        200, ge=1, le=10_000, description="top hits of the one-vector search that get re-ranked"
    )
    index_cache_mb: int = Field(
        1024,
        ge=1,
        description="memory for per-user FAISS indexes in each API process (least recently "
        "searched users are dropped first; about 2.1 KB per image at D=512)",
    )


# Ceilings no deployment can raise: every number a request carries is bounded by one of these
# (or by a setting below them) before it sizes anything.
MAX_K_CEILING = 1000
MAX_OFFSET_CEILING = 100_000
MAX_CONCEPT_IDS = 50  # explicit concept_ids in one search


class LimitSettings(BaseModel):
    """Guards against bad or hostile input."""

    max_upload_bytes: int = Field(25 * 1024 * 1024, ge=1, description="largest accepted file")
    max_pixels: int = Field(
        50_000_000, ge=1, description="decompression-bomb guard (width × height)"
    )
    max_files_per_request: int = Field(200, ge=1, description="files in one upload request")
    max_json_bytes: int = Field(
        1024 * 1024, ge=1024, description="largest request body that is not a file upload"
    )
    max_k: int = Field(
        200,
        ge=1,
        le=MAX_K_CEILING,
        description=f"largest page a search returns (≤ {MAX_K_CEILING})",
    )
    max_offset: int = Field(
        10_000,
        ge=0,
        le=MAX_OFFSET_CEILING,
        description=f"deepest a search pages (offset; offset + k sizes its ranking; "
        f"≤ {MAX_OFFSET_CEILING})",
    )
    max_query_chars: int = Field(1000, ge=1, description="longest query string accepted")


class JobSettings(BaseModel):
    """Background jobs: when one counts as lost and is sent again (app/runtime/reconciler.py)."""

    dead_after_s: float = Field(
        120.0, gt=0, description="a running job without a heartbeat this long is re-queued"
    )
    resend_after_s: float = Field(
        300.0, gt=0, description="a queued job not picked up this long is sent again"
    )
    reconcile_interval_s: float = Field(
        30.0, gt=0, description="how often the API (embedded) or the worker looks for lost jobs"
    )
    nice: int = Field(
        10,
        ge=0,
        le=19,
        description="how much lower the CPU priority of jobs is than that of requests (Unix nice: "
        "the embedded runner's job threads, a Celery worker's task processes); 0 = the same",
    )


class ImmichSettings(BaseModel):
    """The Immich bridge: Immich's machine-learning protocol (`GET /ping`, `POST /predict`)."""

    api_key: str = Field(
        "",
        description="one of this service's API keys: turns the Immich bridge on, and Immich's "
        "smart-search queries are encoded with the concepts of the key's user (Immich sends no "
        "user); empty = bridge off (/ping and /predict answer 404)",
    )
    forward_url: str = Field(
        "",
        description="the real Immich machine-learning URL (http://immich-machine-learning:3003): "
        "face and OCR requests go there unchanged; empty = they are refused",
    )
    forward_timeout_s: float = Field(
        120.0, gt=0, description="seconds a forwarded request may take (connect + answer)"
    )
    allowed_clients: list[str] = Field(
        default_factory=list,
        description="networks whose clients may call /ping and /predict, as a JSON list of "
        'addresses or CIDRs (["172.18.0.0/16"]: Immich\'s container network); others get 403. '
        "Empty = any client that can reach the port",
    )
    text_rate_per_minute: int = Field(
        120,
        ge=0,
        description="textual CLIP requests (searches) one client address may send per minute; "
        "more get 429 (each answer is a personalized vector); 0 = no limit",
    )
    concurrent_images: int = Field(
        1,
        ge=1,
        le=64,
        description="Immich's images (smart-search indexing) encoded at once; more wait, "
        "holding no thread and no search turn",
    )

    @field_validator("allowed_clients")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item.strip(), strict=False)
            except ValueError as e:
                raise ValueError(f"allowed_clients: {item!r} is not an address or CIDR") from e
        return value

    @property
    def enabled(self) -> bool:
        return bool(self.api_key.strip())


class LibrarySettings(BaseModel):
    """Folders indexed in place (POST /libraries): where they may be, and how scans work."""

    roots: list[Path] = Field(
        default_factory=list,
        description="folders under which users may add libraries, as a JSON list "
        '(["/photos"]); nothing outside them is ever read. Empty = libraries are off',
    )
    batch: int = Field(
        200, ge=1, le=10_000, description="files a scan handles per database transaction"
    )
    max_reported: int = Field(
        1000, ge=0, description="skipped files a scan's report lists by name (all are counted)"
    )
    watch: bool = Field(
        True,
        description="watch library folders (inotify) and scan one once it has been quiet for "
        "watch_settle_s; network shares send no events, the periodic rescan covers them",
    )
    watch_settle_s: float = Field(
        10.0, ge=0, le=3600, description="quiet seconds after a change before the scan starts"
    )
    rescan_interval_s: float = Field(
        900.0,
        ge=0,
        description="scan a library again when its last scan is this old (only changed files "
        "are read again); 0 = only on request and on watched changes",
    )


class Settings(BaseSettings):
    """All configuration of the API and the workers."""

    model_config = SettingsConfigDict(
        env_prefix="POLAR_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    data_dir: Path = Field(
        Path("./data"), description="images, thumbnails, the embedding's previews, index files"
    )
    database_url: str = Field(
        "", description="SQLAlchemy URL; empty = SQLite file in the data folder"
    )
    broker_url: str = Field(
        "", description="Celery broker (redis://...); empty = in-process job runner"
    )
    host: str = Field("127.0.0.1", description="address `polar serve` binds")
    port: int = Field(8000, description="port `polar serve` binds")
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="API processes `polar serve` runs (one per core is the most that helps; more "
        "than one needs a broker: the embedded job runner is one process only)",
    )
    request_threads: int = Field(
        16,
        ge=1,
        le=256,
        description="threads per API process that run requests (more requests wait their turn); "
        "the database pool holds as many connections",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="logging level of every process (API, worker, CLI)"
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="log lines as plain text, or one JSON object per line"
    )
    model: ModelSettings = Field(default_factory=ModelSettings)
    threads: ThreadSettings = Field(default_factory=ThreadSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    search: SearchSettings = Field(default_factory=SearchSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    immich: ImmichSettings = Field(default_factory=ImmichSettings)
    library: LibrarySettings = Field(default_factory=LibrarySettings)
    _database_url_derived: bool = PrivateAttr(False)

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'polar.db').as_posix()}"
            self._database_url_derived = True
        if self.workers > 1 and not self.broker_url:
            raise ValueError(
                "workers > 1 needs a broker (POLAR_BROKER_URL): the embedded job runner runs in "
                "one process only"
            )
        if self.training.min_photos > self.training.max_photos:
            raise ValueError("training.min_photos must not exceed training.max_photos")
        return self

    @property
    def database_url_configured(self) -> bool:
        """False when the URL is the default SQLite file in the data folder."""
        return not self._database_url_derived

    @property
    def embedded_jobs(self) -> bool:
        """True when jobs run in the API process (no broker configured)."""
        return not self.broker_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
