"""A training run's recipe, in the one form it has in code, in `run.json` and in `metadata.json`.

A `Recipe` is everything that decides what a run computes: the view it trains on, pinned to a
version, the share of that view's frames held out to choose its best epoch (`selection`), the
profile (network, input size, optimiser, schedule: one of `detector.PROFILES` with overrides),
the starting weights, the seed, the record of how its per-frame sampling weights were made,
when it draws frames by them, and which frames of each footage clip it trains on (`clip_draw`).
Its fields are the serialised keys: the Dagster config builds one, the training processes start
from `as_dict()` in run.json, a checkpoint's metadata.json holds the same keys at its top level
beside what the run measured, and `reproduce` reads it back from there.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from avperception_assets.model import clip_draws
from avperception_assets.model.detector import WEIGHTS_NONE, Profile, get_profile
from avperception_assets.model.loader import ViewRef
from avperception_assets.model.selection import DEFAULT_PCT, Share, check_pct

# Keys that metadata.json files written before they existed lack, with what such a run did:
# it trained on every row of its view (and chose its best epoch on a separate val view), every
# frame of every clip.
NOT_RECORDED_BEFORE = {"selection_pct": None, "clip_draw": clip_draws.ALL}


@dataclass(frozen=True)
class Recipe:
    """What a run trains on, how, from which weights, with which seed and sampling."""

    lancedb_uri: str  # where the views are; not part of what a resume compares (a data folder may move)
    train_view: str
    train_view_version: int
    train_filter: str | None
    # The percentage of the view's frames held out from training to choose the best epoch
    # (`selection.RULE`); 0: none held out, best = last; None: recorded before shares existed.
    selection_pct: int | None
    profile: Profile
    weights_source: str  # 'coco', 'none' or a state_dict path
    seed: int = 0
    # How the sampling weights the run draws frames by were made (hard-example mining's record:
    # scores table, version, model, weighting), kept for `reproduce` and for maintenance's pins;
    # None: every frame alike. The trainer takes the weights themselves.
    mining: dict[str, Any] | None = None
    # Which frames of each footage clip it trains on (`clip_draws`): 'all', 'stride:K' or 'novelty:T'.
    clip_draw: str = clip_draws.ALL

    def __post_init__(self):
        check_pct(self.selection_pct)
        object.__setattr__(self, "clip_draw", clip_draws.canonical(self.clip_draw))
        # COCO weights keep the anchors their RPN learned.
        object.__setattr__(self, "profile", self.profile.for_weights(self.weights_source))

    @classmethod
    def on(cls, train: ViewRef, profile: Profile, *, selection_pct: int = DEFAULT_PCT, weights: str = WEIGHTS_NONE,
           seed: int = 0, mining: Mapping[str, Any] | None = None, clip_draw: str = clip_draws.ALL) -> "Recipe":
        """The recipe that trains `profile` on the frames `clip_draw` draws from the rows of `train`
        outside its selection share of `selection_pct` percent, and keeps the epoch that share
        scores best."""
        return cls(lancedb_uri=train.uri, train_view=train.name, train_view_version=train.version,
                   train_filter=train.where, selection_pct=selection_pct, profile=profile, weights_source=weights,
                   seed=seed, mining=dict(mining) if mining else None, clip_draw=clip_draw)

    @property
    def train(self) -> ViewRef:
        """The frames the run trains on: those its clip draw draws from the view's rows outside
        the selection share."""
        share = Share(self.selection_pct, held_out=False) if self.selection_pct else None
        return ViewRef(self.lancedb_uri, self.train_view, self.train_view_version, self.train_filter, share,
                       clip_draws.parse(self.clip_draw))

    @property
    def selection(self) -> ViewRef | None:
        """The frames held out to choose the best epoch (every one, never drawn); None when none are."""
        if not self.selection_pct:
            return None
        return ViewRef(self.lancedb_uri, self.train_view, self.train_view_version, self.train_filter,
                       Share(self.selection_pct, held_out=True))

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """The serialised recipe, JSON-shaped (so it equals what a file holds once read back)."""
        return json.loads(json.dumps({**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
                                      "profile": self.profile.as_dict()}))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, uri: str | None = None) -> "Recipe":
        """The recipe in `data` (a run.json, or a metadata.json with what the run measured beside
        it), its views read from `uri` when given instead of the recorded location."""
        values = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name not in NOT_RECORDED_BEFORE}
        values.update({name: data.get(name, before) for name, before in NOT_RECORDED_BEFORE.items()},
                      profile=get_profile(**data["profile"]))
        return cls(**{**values, "lancedb_uri": uri or values["lancedb_uri"]})

    def recorded_in(self, saved: Mapping[str, Any]) -> bool:
        """Whether a checkpoint folder's metadata records this recipe, and so may be resumed.
        The data location is left out: a moved data folder resumes."""
        mine = {key: value for key, value in self.as_dict().items() if key != "lancedb_uri"}
        recorded = {**NOT_RECORDED_BEFORE, **{k: saved[k] for k in mine if k in saved}}
        return recorded == mine
