//! The kernels run by the emulator against the CPU backend, from Rust (no Python): what the
//! ThreadSanitizer build (`scripts/tsan.sh`) executes. The Python suite covers the full
//! argument space (`tests/test_cuda_emulated.py`).

use super::{Executor, align as kalign, dapo as kdapo, rows as krows};
use crate::dispatch::align;
use crate::op::align::{AlignBuffers, AlignConfig, AlignInputs};
use crate::op::anchor_plan::{self, Anchors, RowSpace};
use crate::op::dapo::{
    AggConfig, ClipConfig, NormaliserTensors, PolicyForwardBuffers, PolicyInputs,
};
use crate::op::groups::Grouping;
use crate::tensor::TensorRef;

const EMU: Executor = Executor::Emulated;

/// Deterministic pseudo-random values in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

/// A one-element slice seen as a 0-d tensor.
fn scalar_view<'a, T: crate::tensor::HasDType>(
    name: &'static str,
    v: &'a mut [T],
) -> TensorRef<'a> {
    assert_eq!(v.len(), 1);
    // SAFETY: the single element of a live slice borrowed for 'a.
    unsafe {
        TensorRef::from_raw_parts(
            name,
            v.as_mut_ptr().cast(),
            T::DTYPE,
            crate::tensor::Device::Cpu,
            vec![],
            vec![],
        )
    }
}

#[test]
fn alignment_forward_and_backward_match_the_cpu_backend() {
    let (b, t, h) = (8usize, 3usize, 40usize);
    let mut hidden = noise(b * t * h, 1);
    let mut index: Vec<i64> = vec![0, 2, 1, -1, 2, 0, 1, 1];
    let mut rewards: Vec<f32> = vec![1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0];
    let mut labels: Vec<i64> = vec![5, 9, 5, 9, 5, 9, 5, 9];
    for (loss_type, reduction) in [("cosine", "mean"), ("contrastive", "sum"), ("mse", "none")] {
        let cfg = AlignConfig::new(loss_type, reduction, 1e-8, 0.1).unwrap();
        let hv = TensorRef::from_slice("hidden", &mut hidden, &[b, t, h]);
        let iv = TensorRef::from_slice("mask", &mut index, &[b]);
        let rv = TensorRef::from_slice("rewards", &mut rewards, &[b]);
        let lv = TensorRef::from_slice("group_ids", &mut labels, &[b]);
        let anchors = Anchors::Index(iv);
        let grouping = Grouping::Ids(lv);

        let plan = anchor_plan::plan(&hv, &anchors, &rv, &grouping, 0.5, None).unwrap();
        let cpu = align::forward(&hv, &plan, &cfg).unwrap();
        let upstream: Vec<f64> = if reduction == "none" {
            vec![1.0, 0.5]
        } else {
            vec![1.0]
        };
        let mut cpu_grad = vec![0f32; b * h];
        align::backward(
            &hv,
            &plan,
            &cfg,
            &upstream,
            &mut TensorRef::from_slice("g", &mut cpu_grad, &[b, h]),
        )
        .unwrap();

        let (mut rows, mut groups) = (vec![0i64; b], vec![0i64; b]);
        let (mut correct, mut valid) = (vec![false; b], vec![false; b]);
        let (mut group_loss, mut loss, mut cosine) = (vec![0f32; b], vec![0f32], vec![0f32]);
        let mut counts = vec![0i64; 2];
        let mut work = vec![0f32; kalign::WORK_ROWS * b];
        let mut links = vec![0i32; crate::cuda::align::LINK_ROWS * b + 1];
        let bufs = AlignBuffers {
            rows: &TensorRef::from_slice("rows", &mut rows, &[b]),
            groups: &TensorRef::from_slice("groups", &mut groups, &[b]),
            correct: &TensorRef::from_slice("correct", &mut correct, &[b]),
            group_loss: &TensorRef::from_slice("group_loss", &mut group_loss, &[b]),
            group_valid: &TensorRef::from_slice("group_valid", &mut valid, &[b]),
            loss: &scalar_view("loss", &mut loss),
            mean_cosine: &scalar_view("mean_cosine", &mut cosine),
            counts: &TensorRef::from_slice("counts", &mut counts, &[2]),
            work: &TensorRef::from_slice("work", &mut work, &[kalign::WORK_ROWS, b]),
            links: &TensorRef::from_slice(
                "links",
                &mut links,
                &[crate::cuda::align::LINK_ROWS * b + 1],
            ),
        };
        let inputs = AlignInputs {
            anchors: &anchors,
            rewards: &rv,
            threshold: 0.5,
            grouping: &grouping,
            cu_seqlens: None,
        };
        let groups_bound = align::forward_kernels(&EMU, &hv, &inputs, &cfg, &bufs).unwrap();
        assert_eq!(groups_bound, b);
        let mut up: Vec<f32> = upstream.iter().map(|&x| x as f32).collect();
        let up_shape: &[usize] = if reduction == "none" { &[2] } else { &[] };
        let n_up = up.len();
        let mut up_t = TensorRef::from_slice("grad_output", &mut up, &[n_up]);
        if up_shape.is_empty() {
            // SAFETY: the same single element, seen as a 0-d tensor.
            up_t = unsafe {
                TensorRef::from_raw_parts(
                    "grad_output",
                    up_t.data_ptr(),
                    up_t.dtype(),
                    up_t.device(),
                    vec![],
                    vec![],
                )
            };
        }
        let mut centre = vec![0f32; b * h];
        let mut grad = vec![0f32; b * h];
        align::backward_kernels(
            &EMU,
            &hv,
            &cfg,
            &bufs,
            2,
            &up_t,
            &TensorRef::from_slice("centre", &mut centre, &[b, h]),
            &TensorRef::from_slice("grad_rows", &mut grad, &[b, h]),
        )
        .unwrap();
        assert_eq!(rows, plan.rows, "{loss_type}");
        assert_eq!(
            groups,
            plan.group.iter().map(|&g| g as i64).collect::<Vec<_>>()
        );
        let cpu_loss: Vec<f32> = cpu.group_loss.iter().map(|&x| x as f32).collect();
        close(&group_loss[..2], &cpu_loss, 1e-5, loss_type);
        close(&loss, &[cpu.loss as f32], 1e-5, loss_type);
        assert_eq!(
            counts,
            [cpu.valid_groups as i64, cpu.anchored_correct as i64]
        );
        close(&grad, &cpu_grad, 1e-4, loss_type);
    }
}

#[test]
fn policy_forward_and_backward_match_the_cpu_backend() {
    let (b, t) = (3usize, 300usize);
    let mut lp = noise(b * t, 2);
    let mut old: Vec<f32> = lp
        .iter()
        .zip(noise(b * t, 3))
        .map(|(x, n)| x + 0.4 * n)
        .collect();
    let mut adv = noise(b, 4);
    let mut mask: Vec<f32> = noise(b * t, 5)
        .iter()
        .map(|&x| (x > -0.4) as i32 as f32)
        .collect();
    let clip = ClipConfig::new(0.2, 0.28, 3.0, Some(20.0)).unwrap();
    let agg = AggConfig::new("seq-mean-token-mean", None, 1, None, None).unwrap();
    let inputs = PolicyInputs {
        log_prob: TensorRef::from_slice("log_prob", &mut lp, &[b, t]),
        old_log_prob: TensorRef::from_slice("old_log_prob", &mut old, &[b, t]),
        advantages: TensorRef::from_slice("advantages", &mut adv, &[b]),
        response_mask: TensorRef::from_slice("response_mask", &mut mask, &[b, t]),
        rollout_is_weights: None,
    };
    let norms = NormaliserTensors::default();
    let (mut scale_cpu, mut factor_cpu) = (vec![0f32; b], vec![0f32; b * t]);
    let cpu = crate::cpu::dapo::policy_forward::<f32, f32>(
        &inputs,
        (b, t),
        &clip,
        &agg,
        &mut scale_cpu,
        Some(&mut factor_cpu),
    );
    let (mut loss, mut metrics) = (vec![0f32], vec![0f32; 3]);
    let (mut scale, mut factor) = (vec![0f32; b], vec![0f32; b * t]);
    let chunks = kdapo::policy_chunks(t);
    let mut partials = vec![0f64; b * chunks * kdapo::POLICY_SUMS];
    {
        let factor_t = TensorRef::from_slice("factor", &mut factor, &[b, t]);
        let bufs = PolicyForwardBuffers {
            loss: &scalar_view("loss", &mut loss),
            metrics: &TensorRef::from_slice("metrics", &mut metrics, &[3]),
            row_scale: &TensorRef::from_slice("row_scale", &mut scale, &[b]),
            factor: Some(&factor_t),
            partials: &TensorRef::from_slice("partials", &mut partials, &[b, chunks, 5]),
        };
        kdapo::policy_forward(&EMU, &inputs, (b, t), &clip, &agg, &norms, &bufs).unwrap();
    }
    close(&loss, &[cpu.loss as f32], 1e-5, "loss");
    close(
        &metrics,
        &[
            cpu.pg_clipfrac as f32,
            cpu.ppo_kl as f32,
            cpu.pg_clipfrac_lower as f32,
        ],
        1e-5,
        "metrics",
    );
    close(&scale, &scale_cpu, 1e-6, "row_scale");
    close(&factor, &factor_cpu, 1e-5, "factor");
    let mut up = vec![2.0f32];
    let up_t = scalar_view("grad_output", &mut up);
    let expected: Vec<f32> = factor_cpu
        .iter()
        .enumerate()
        .map(|(i, f)| f * 2.0 * scale_cpu[i / t])
        .collect();
    let mut scale_t = scale.clone();
    let st = TensorRef::from_slice("row_scale", &mut scale_t, &[b]);
    for saved in [true, false] {
        let mut grad = if saved {
            factor.clone()
        } else {
            vec![0f32; b * t]
        };
        let gt = TensorRef::from_slice("grad", &mut grad, &[b, t]);
        kdapo::policy_backward(&EMU, &inputs, (b, t), &clip, &st, &up_t, &gt, saved).unwrap();
        close(&grad, &expected, 1e-5, "grad");
    }
}

#[test]
fn small_dapo_ops_and_row_scatter_match_the_cpu_backend() {
    let b = 37usize; // a partial last warp
    let mut scores = noise(b, 6);
    let labels: Vec<i64> = (0..b as i64).map(|i| (i * 7) % 5).collect();
    let (out, cpu, _) = advantages_by_label(&mut scores, labels);
    assert_eq!(out, cpu);
    let sv = TensorRef::from_slice("scores", &mut scores, &[b]);
    let mut order = vec![0i32; 2 * b];

    let mut keep = vec![false; b];
    kdapo::dynamic_sampling_mask(
        &EMU,
        &sv,
        &Grouping::Size(1),
        &TensorRef::from_slice("order", &mut order, &[2 * b]),
        &TensorRef::from_slice("out", &mut keep, &[b]),
    )
    .unwrap();
    assert!(keep.iter().all(|&k| k), "singleton groups are kept");

    let mut lengths: Vec<i64> = (0..b as i64).collect();
    let mut pen = vec![0f32; b];
    kdapo::overlong_penalty(
        &EMU,
        &TensorRef::from_slice("lengths", &mut lengths, &[b]),
        30.0,
        8.0,
        1.0,
        &TensorRef::from_slice("out", &mut pen, &[b]),
    )
    .unwrap();
    for (l, p) in pen.iter().enumerate() {
        assert_eq!(*p, (-((l as f64) - 22.0) / 8.0).min(0.0) as f32);
    }

    let (rows_n, h) = (6usize, 300usize);
    let mut dst = noise(rows_n * h, 7);
    let mut expected = dst.clone();
    let mut rows: Vec<i64> = vec![4, -1, 4, 0];
    let mut vals = noise(rows.len() * h, 8);
    for (j, &r) in rows.iter().enumerate() {
        if r >= 0 {
            for k in 0..h {
                expected[r as usize * h + k] += vals[j * h + k];
            }
        }
    }
    let dv = TensorRef::from_slice("dst", &mut dst, &[rows_n, h]);
    let space = RowSpace::of(&dv).unwrap();
    let rv = TensorRef::from_slice("rows", &mut rows, &[4]);
    let vv = TensorRef::from_slice("vals", &mut vals, &[4, h]);
    let mut links = vec![0i32; 4 * 4];
    let lv = TensorRef::from_slice("links", &mut links, &[16]);
    krows::scatter_add(&EMU, &dv, &space, &rv, &vv, &lv).unwrap();
    assert_eq!(dst, expected);
}

/// Group advantages by `labels` through the kernels and through the CPU backend, and the
/// order the label sort left in its scratch.
fn advantages_by_label(
    scores: &mut [f32],
    mut labels: Vec<i64>,
) -> (Vec<f32>, Vec<f32>, Vec<usize>) {
    let b = scores.len();
    let mut totals = vec![0f64; b];
    let mut order = vec![0i32; 2 * b];
    let mut out = vec![0f32; b];
    let grouping = Grouping::Ids(TensorRef::from_slice("group_ids", &mut labels, &[b]));
    let sv = TensorRef::from_slice("scores", scores, &[b]);
    kdapo::group_advantages(
        &EMU,
        &sv,
        &grouping,
        1e-6,
        true,
        &TensorRef::from_slice("totals", &mut totals, &[b]),
        &TensorRef::from_slice("order", &mut order, &[2 * b]),
        &TensorRef::from_slice("out", &mut out, &[b]),
    )
    .unwrap();
    let (group, n) = crate::op::groups::dense_groups(&grouping, b).unwrap();
    let sums: Vec<f64> = sv.to_f64_vec().unwrap();
    let mut cpu = vec![0f32; b];
    crate::cpu::dapo::group_advantages(&sums, &group, n, 1e-6, true, &mut cpu);
    let sorted = order[..b].iter().map(|&i| i as usize).collect();
    (out, cpu, sorted)
}

/// The one-block label sort at sizes that give each thread several elements and leave runs
/// of unequal length: groups, their order and the advantages agree with the CPU backend.
#[test]
fn label_sort_groups_match_the_cpu_backend_at_larger_batches() {
    for b in [1usize, 2, 255, 257, 1000] {
        let mut scores = noise(b, 11);
        // Labels in a scrambled order, some negative, with unequal group sizes.
        let labels: Vec<i64> = (0..b as i64).map(|i| ((i * 7919) % 61) - 30).collect();
        let (out, cpu, sorted) = advantages_by_label(&mut scores, labels.clone());
        let mut expected: Vec<usize> = (0..b).collect();
        expected.sort_by_key(|&i| (labels[i], i));
        assert_eq!(sorted, expected, "b = {b}");
        assert_eq!(out, cpu, "b = {b}");
    }
}

#[test]
fn find_anchors_matches_the_cpu_backend_across_tiles() {
    use crate::dispatch::anchors::find_anchors;
    use crate::op::anchors::{FindAnchors, Markers, Occurrence};
    // Rows longer than one tile of 256 start columns, markers planted in the first, a middle
    // and the last tile, spellings that overlap and share a start, masks that cut matches.
    let (b, t) = (6usize, 700usize);
    let mut tokens: Vec<i64> = (0..b * t).map(|i| 100 + (i * 7919 % 61) as i64).collect();
    let mut mask: Vec<u8> = vec![1; b * t];
    let plant = |tokens: &mut [i64], r: usize, s: usize, m: &[i64]| {
        tokens[r * t + s..r * t + s + m.len()].copy_from_slice(m);
    };
    let (short, long) = ([7i64, 8], [7i64, 8, 9]);
    plant(&mut tokens, 0, 3, &long);
    plant(&mut tokens, 0, 650, &short);
    plant(&mut tokens, 1, 300, &long);
    plant(&mut tokens, 2, 10, &short);
    plant(&mut tokens, 2, 699 - 1, &short); // ends at the last column
    plant(&mut tokens, 3, 512, &short);
    mask[3 * t + 513] = 0; // the only match leaves the response
    plant(&mut tokens, 4, 0, &long);
    let mut marker_tokens: Vec<i64> = short.iter().chain(&long).copied().collect();
    let mut marker_offsets: Vec<i64> = vec![0, 2, 5];
    for occurrence in [Occurrence::Last, Occurrence::First] {
        for offset in [-1i64, 0, 2, -4, i64::MIN, i64::MAX] {
            let mut got = [vec![0i64; b], vec![0i64; b]];
            for (k, exec) in [None, Some(EMU)].into_iter().enumerate() {
                let inputs = FindAnchors {
                    token_ids: TensorRef::from_slice("token_ids", &mut tokens, &[b, t]),
                    response_mask: TensorRef::from_slice("response_mask", &mut mask, &[b, t]),
                    markers: Markers::Tokens {
                        tokens: TensorRef::from_slice("marker_tokens", &mut marker_tokens, &[5]),
                        offsets: TensorRef::from_slice("marker_offsets", &mut marker_offsets, &[3]),
                    },
                    occurrence,
                    offset,
                };
                let mut out = TensorRef::from_slice("out", &mut got[k], &[b]);
                match exec {
                    None => find_anchors(&inputs, &mut out, None).unwrap(),
                    Some(e) => {
                        inputs.check().unwrap();
                        super::anchors::find_anchors(&e, &inputs, (b, t), &out).unwrap()
                    }
                }
            }
            assert_eq!(got[0], got[1], "{occurrence:?} offset {offset}");
            if offset == -1 {
                let want = match occurrence {
                    Occurrence::Last => [649i64, 299, 697, -1, -1, -1],
                    Occurrence::First => [2i64, 299, 9, -1, -1, -1],
                };
                assert_eq!(got[0], want, "{occurrence:?}");
            }
            if offset == 0 && occurrence == Occurrence::First {
                assert_eq!(got[0], [3, 300, 10, -1, 0, -1]);
            }
        }
    }
}

#[test]
fn find_text_anchors_matches_the_cpu_backend_across_tiles() {
    use crate::dispatch::anchors::find_anchors;
    use crate::op::anchors::{FindAnchors, Markers, Occurrence, TextMarkers, can_start};
    // A vocabulary in which the marker "<a>" is spelled whole, split, merged with the bytes
    // before or after it, or interrupted; rows longer than one tile of start columns.
    let vocab: [&[u8]; 9] = [b"x", b"y<", b"a", b">z", b"<a>", b"<", b"a>", b"", b"q<a"];
    let markers: [&[u8]; 1] = [b"<a>"];
    let (b, t) = (6usize, 700usize);
    let mut tokens: Vec<i64> = (0..b * t).map(|i| (i % 2) as i64).collect();
    let mut mask: Vec<u8> = vec![1; b * t];
    let plant = |tokens: &mut [i64], r: usize, s: usize, m: &[i64]| {
        tokens[r * t + s..r * t + s + m.len()].copy_from_slice(m);
    };
    plant(&mut tokens, 0, 3, &[1, 2, 3]); // "y<" "a" ">z"
    plant(&mut tokens, 0, 650, &[4]);
    plant(&mut tokens, 1, 300, &[5, 7, 6]); // "<" "" "a>"
    plant(&mut tokens, 2, 10, &[8, 3]); // "q<a" ">z"
    plant(&mut tokens, 2, 698, &[5, 6]); // ends at the last column
    plant(&mut tokens, 3, 512, &[1, 6]);
    mask[3 * t + 513] = 0; // the only match leaves the response
    plant(&mut tokens, 4, 0, &[4]);
    plant(&mut tokens, 5, 100, &[1, 99, 6]); // an id outside the vocabulary breaks it
    let pack = |pieces: &[&[u8]]| {
        let mut offsets = vec![0i64];
        for p in pieces {
            offsets.push(offsets.last().unwrap() + p.len() as i64);
        }
        (pieces.concat(), offsets)
    };
    let (mut vb, mut vo) = pack(&vocab);
    let (mut mb, mut mo) = pack(&markers);
    let mut starts: Vec<u8> = vocab.iter().map(|v| can_start(v, &markers) as u8).collect();
    let (nvb, nvo, nmb, nmo) = (vb.len(), vo.len(), mb.len(), mo.len());
    for occurrence in [Occurrence::Last, Occurrence::First] {
        for offset in [-1i64, 0, 2, i64::MIN] {
            let mut got = [vec![0i64; b], vec![0i64; b]];
            for (k, exec) in [None, Some(EMU)].into_iter().enumerate() {
                let inputs = FindAnchors {
                    token_ids: TensorRef::from_slice("token_ids", &mut tokens, &[b, t]),
                    response_mask: TensorRef::from_slice("response_mask", &mut mask, &[b, t]),
                    markers: Markers::Text(TextMarkers {
                        vocab_bytes: TensorRef::from_slice("vocab_bytes", &mut vb, &[nvb]),
                        vocab_offsets: TensorRef::from_slice("vocab_offsets", &mut vo, &[nvo]),
                        token_starts: TensorRef::from_slice("token_starts", &mut starts, &[9]),
                        marker_bytes: TensorRef::from_slice("marker_bytes", &mut mb, &[nmb]),
                        marker_offsets: TensorRef::from_slice("marker_offsets", &mut mo, &[nmo]),
                    }),
                    occurrence,
                    offset,
                };
                let mut out = TensorRef::from_slice("out", &mut got[k], &[b]);
                match exec {
                    None => find_anchors(&inputs, &mut out, None).unwrap(),
                    Some(e) => {
                        inputs.check().unwrap();
                        super::anchors::find_anchors(&e, &inputs, (b, t), &out).unwrap()
                    }
                }
            }
            assert_eq!(got[0], got[1], "{occurrence:?} offset {offset}");
            if offset == 0 {
                let want = match occurrence {
                    Occurrence::Last => [650i64, 300, 698, -1, 0, -1],
                    Occurrence::First => [3i64, 300, 10, -1, 0, -1],
                };
                assert_eq!(got[0], want, "{occurrence:?}");
            }
        }
    }
}

#[test]
fn token_logprobs_match_the_cpu_backend() {
    use crate::dispatch::logprobs;
    use crate::op::logprobs::{LogprobBackward, LogprobForward, LogprobOptions, LogprobOutputs};
    // V longer than one block of columns and not a multiple of it; an ignored row, a row whose
    // target is V - 1, -inf entries.
    let (n, v) = (5usize, 700usize);
    let mut logits: Vec<f32> = noise(n * v, 11).iter().map(|x| x * 8.0).collect();
    logits[2 * v + 3] = f32::NEG_INFINITY;
    let mut targets: Vec<i64> = vec![3, -100, 0, v as i64 - 1, 42];
    let mut g_lp: Vec<f32> = noise(n, 12);
    let mut g_ent: Vec<f32> = noise(n, 13);
    let options = LogprobOptions::new(0.7, -100).unwrap();
    let fresh = || [vec![0f32; n], vec![0f32; 2 * n], vec![0f32; n]];
    let mut outs = [fresh(), fresh()];
    let mut grads = [logits.clone(), logits.clone()];
    for (k, exec) in [None, Some(EMU)].into_iter().enumerate() {
        let [lp, stats, ent] = &mut outs[k];
        let inputs = LogprobForward {
            logits: TensorRef::from_slice("logits", &mut logits, &[n, v]),
            targets: TensorRef::from_slice("targets", &mut targets, &[n]),
            options,
        };
        let mut out = LogprobOutputs {
            logprob: TensorRef::from_slice("out_logprob", lp, &[n]),
            entropy: Some(TensorRef::from_slice("out_entropy", ent, &[n])),
            stats: TensorRef::from_slice("out_stats", stats, &[n, 2]),
        };
        match exec {
            None => logprobs::forward(&inputs, &mut out, None).unwrap(),
            Some(e) => {
                let shape = inputs.check(&out).unwrap();
                super::logprobs::forward(&e, &inputs, &out, shape).unwrap()
            }
        }
        drop(out);
        let backward = LogprobBackward {
            logits: TensorRef::from_slice("logits", &mut grads[k], &[n, v]),
            targets: TensorRef::from_slice("targets", &mut targets, &[n]),
            options,
            stats: TensorRef::from_slice("stats", stats, &[n, 2]),
            entropy: Some(TensorRef::from_slice("entropy", ent, &[n])),
            grad_logprob: Some(TensorRef::from_slice("grad_logprob", &mut g_lp, &[n])),
            grad_entropy: Some(TensorRef::from_slice("grad_entropy", &mut g_ent, &[n])),
        };
        match exec {
            None => logprobs::backward(&backward, None).unwrap(),
            Some(e) => {
                let shape = backward.check().unwrap();
                super::logprobs::backward(&e, &backward, shape).unwrap()
            }
        }
    }
    for (j, (cpu, emulated)) in outs[0].iter().zip(&outs[1]).enumerate() {
        for (i, (a, b)) in cpu.iter().zip(emulated).enumerate() {
            let close = (a - b).abs() <= 2e-5 * (1.0 + a.abs());
            assert!(close, "output {j} item {i}: {a} vs {b}");
        }
    }
    assert_eq!(outs[1][0][1], 0.0);
    for (i, (a, b)) in grads[0].iter().zip(&grads[1]).enumerate() {
        assert!((a - b).abs() <= 1e-6, "gradient {i}: {a} vs {b}");
    }
    assert!(grads[1][v..2 * v].iter().all(|&g| g == 0.0));
}
