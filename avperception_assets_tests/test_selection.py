"""The selection rule: which train frames are held out to choose a checkpoint's best epoch."""

from __future__ import annotations

import hashlib

import pytest

from avperception_assets.model.selection import DEFAULT_PCT, Share, bucket, held_out

IDS = [f"{n:08x}-{n * 7919 % 65536:04x}.jpg" for n in range(5000)]


def test_a_frame_keeps_its_role_as_footage_is_added():
    before = held_out(IDS[:3000], None, DEFAULT_PCT)
    after = held_out(IDS, None, DEFAULT_PCT)  # 2,000 frames appended
    assert (after[:3000] == before).all()
    assert (held_out(IDS[3000:] + IDS[:3000], None, DEFAULT_PCT)[2000:] == before).all()  # in any order


def test_the_share_is_about_the_percentage_asked():
    for pct in (5, DEFAULT_PCT, 30):
        assert abs(held_out(IDS, None, pct).mean() - pct / 100) < 0.015
    assert not held_out(IDS, None, 0).any()


def test_a_frame_with_a_clip_goes_where_its_clip_goes():
    clips = [f"clip-{n // 50}" for n in range(len(IDS))]  # 100 clips of 50 frames
    sides = held_out(IDS, clips, 20)
    for start in range(0, len(IDS), 50):
        assert len(set(sides[start:start + 50])) == 1
    assert 0 < sides.mean() < 1
    # Without a clip (none, or an empty value) a frame goes by its image id.
    no_clips = held_out(IDS[:200], [None, ""] * 100, 20)
    assert (no_clips == held_out(IDS[:200], None, 20)).all()


def test_the_rule_is_sha1_of_the_id_mod_100():
    """Pinned to a digest, not to Python's per-process `hash`: every process, machine and release
    splits the same frames alike (a frame's role never changes)."""
    for key in ("b1d0a191-06deb55d.jpg", "clip-0007"):
        assert bucket(key) == int(hashlib.sha1(key.encode()).hexdigest(), 16) % 100
    assert [bucket(k) for k in ("b1d0a191-06deb55d.jpg", "clip-0007")] == [81, 23]
    assert bucket("any.jpg", "clip-0007") == bucket("clip-0007")


def test_a_share_and_its_complement_partition_the_frames():
    selection, training = Share(DEFAULT_PCT, held_out=True), Share(DEFAULT_PCT, held_out=False)
    picked, trained = selection.keeps(IDS, None), training.keeps(IDS, None)
    assert (picked ^ trained).all()
    with pytest.raises(ValueError, match="0..99"):
        Share(100, held_out=True)
