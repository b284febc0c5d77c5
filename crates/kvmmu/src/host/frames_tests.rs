//! Unit tests of the frame arena (`frames.rs`).

use super::*;

#[test]
fn tag_round_trips_host_page_and_generation() {
    let t = FrameTag::from_parts(FrameTag::MAX_HOST_PAGE, u32::MAX);
    assert_eq!(t.host_page(), FrameTag::MAX_HOST_PAGE);
    assert_eq!(t.generation(), u32::MAX);
    assert!(!t.is_free());
    assert!(FrameTag::FREE.is_free());
    assert_eq!(FrameTag::from_parts(0, 0).host_page(), 0);
    assert_ne!(FrameTag::from_parts(0, 0), FrameTag::FREE);
}

#[test]
fn invalid_frame_counts_are_rejected() {
    assert!(matches!(
        FrameArena::new(0),
        Err(HostError::InvalidFrameCount { frames: 0 })
    ));
    assert!(matches!(
        FrameArena::new(MAX_FRAMES + 1),
        Err(HostError::InvalidFrameCount { .. })
    ));
}

#[test]
fn reused_frame_is_zero_filled_with_new_generation() {
    let a = FrameArena::new(1).unwrap();
    let (p, t) = a.alloc(5).unwrap();
    a.write_u64(p, 3, t, 0xdead).unwrap();
    a.free(p, t).unwrap();
    let (p2, t2) = a.alloc(6).unwrap();
    assert_eq!(p2, p);
    assert_ne!(t2, t);
    assert_eq!(t2.generation(), t.generation() + 1);
    assert_eq!(t2.host_page(), 6);
    assert_eq!(a.read_u64(p2, 3, t2).unwrap(), 0);
}

#[test]
fn every_word_of_every_frame_keeps_its_own_value() {
    let a = FrameArena::new(3).unwrap();
    let frames: Vec<_> = (0..3).map(|i| a.alloc(i).unwrap()).collect();
    for (f, &(p, t)) in frames.iter().enumerate() {
        for w in 0..WORDS_PER_FRAME {
            a.write_u64(p, w, t, (f * WORDS_PER_FRAME + w) as u64)
                .unwrap();
        }
    }
    for (f, &(p, t)) in frames.iter().enumerate() {
        for w in 0..WORDS_PER_FRAME {
            assert_eq!(
                a.read_tagged(p, w, t).unwrap(),
                (f * WORDS_PER_FRAME + w) as u64
            );
        }
    }
}

#[test]
fn tagged_accesses_report_stale_free_and_out_of_range_frames() {
    let a = FrameArena::new(1).unwrap();
    let (p, t) = a.alloc(5).unwrap();
    a.write_tagged(p, 0, t, 9).unwrap();
    a.free(p, t).unwrap();
    let (p2, t2) = a.alloc(6).unwrap();
    assert_eq!(p2, p);
    let e = a.read_tagged(p, 0, t).unwrap_err();
    assert_eq!((e.expected, e.found), (t, t2));
    let e = a.write_tagged(p, 0, t, 1).unwrap_err();
    assert_eq!((e.expected, e.found), (t, t2));
    assert_eq!(
        a.read_tagged(p2, 0, t2).unwrap(),
        0,
        "the stale write was refused"
    );
    let e = a.read_tagged(Pfn::new(7), 0, t2).unwrap_err();
    assert_eq!(e.found, FrameTag::FREE);
    let e = a.read_tagged(p2, WORDS_PER_FRAME, t2).unwrap_err();
    assert_eq!(e.found, FrameTag::FREE);
    assert!(a.read_tagged(p2, 0, FrameTag::FREE).is_err());
    assert_eq!(a.stats().stale_accesses, 5);
}

#[test]
fn accesses_after_the_callers_tag_load_still_report_a_frame_reused_since() {
    let a = FrameArena::new(1).unwrap();
    let (p, t) = a.alloc(5).unwrap();
    // A TLB fill: the caller loads the tag, then accesses with only the check after.
    let seen = a.tag(p);
    assert_eq!(seen, t);
    a.write_after_tag(p, 1, seen, 9).unwrap();
    assert_eq!(a.read_after_tag(p, 1, seen).unwrap(), 9);
    // The frame is freed and reused between the caller's tag load and the access.
    a.free(p, t).unwrap();
    let (p2, t2) = a.alloc(6).unwrap();
    assert_eq!(p2, p);
    let e = a.read_after_tag(p, 1, seen).unwrap_err();
    assert_eq!((e.expected, e.found), (t, t2));
    let e = a.write_after_tag(p, 1, seen, 3).unwrap_err();
    assert_eq!((e.expected, e.found), (t, t2));
    // Without a check before the store, a store racing a reuse lands and is then reported, as
    // one in `write_tagged`'s window between its two checks: reported, never silent (invariant 3).
    assert_eq!(a.read_tagged(p2, 1, t2).unwrap(), 3);
    // A free tag, a pfn outside the arena and a word past the frame are reported too.
    assert!(a.read_after_tag(p2, 0, FrameTag::FREE).is_err());
    assert!(a.write_after_tag(p2, 0, FrameTag::FREE, 1).is_err());
    assert_eq!(
        a.read_tagged(p2, 0, t2).unwrap(),
        0,
        "a FREE expect stores nothing"
    );
    let e = a.read_after_tag(Pfn::new(7), 0, t2).unwrap_err();
    assert_eq!(e.found, FrameTag::FREE);
    let e = a.write_after_tag(p2, WORDS_PER_FRAME, t2, 1).unwrap_err();
    assert_eq!(e.found, FrameTag::FREE);
    assert_eq!(a.stats().stale_accesses, 6);
}

#[test]
fn frames_freed_by_one_thread_serve_another() {
    let a = FrameArena::new(64).unwrap();
    let frames: Vec<_> = (0..64).map(|i| a.alloc(i).unwrap()).collect();
    assert!(matches!(a.alloc(99), Err(HostError::OutOfFrames)));
    for &(p, t) in &frames {
        a.free(p, t).unwrap();
    }
    // Another thread (usually on another stripe, so it steals) reuses every freed frame.
    std::thread::scope(|s| {
        s.spawn(|| {
            let got: Vec<_> = (0..64).map(|i| a.alloc(i).unwrap()).collect();
            assert!(matches!(a.alloc(99), Err(HostError::OutOfFrames)));
            for (p, t) in got {
                a.free(p, t).unwrap();
            }
        });
    });
    let st = a.stats();
    assert_eq!(st.allocated, 0);
    assert_eq!(st.total_allocs, 128);
    assert_eq!(st.total_frees, 128);
}

#[test]
fn a_frame_freed_by_this_thread_is_reused_before_a_never_used_one() {
    let a = FrameArena::new(8).unwrap();
    // The stripe starts empty (its hint sends the first allocation to the bump pointer).
    let (p0, t0) = a.alloc(1).unwrap();
    assert_eq!(p0, Pfn::new(0));
    a.free(p0, t0).unwrap();
    // The free republished the hint under the stripe's mutex: the same thread sees it.
    let (p, _) = a.alloc(2).unwrap();
    assert_eq!(p, p0, "the freed frame, not frame 1");
    let (q, _) = a.alloc(3).unwrap();
    assert_eq!(
        q,
        Pfn::new(1),
        "the stripe is empty again: the bump pointer"
    );
    assert_eq!(a.stats().allocated, 2);
}
