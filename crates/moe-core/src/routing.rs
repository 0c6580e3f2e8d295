//! Routing and slot math shared by every backend: which ranks a token goes to, which slot it
//! takes there, and how received top-k rows are rewritten to the id convention.

use crate::config::ExpertPlacement;

/// Where each (token, k) pair of a batch is sent.
///
/// For each token, the first of its top-k slots whose expert lives on a rank not yet seen for
/// that token carries the send: `(target, slot)`, where `slot` counts the tokens already sent to
/// `target` in token order. Later slots of the same token and rank carry nothing, so a token
/// reaches each rank at most once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendPlan {
    top_k: usize,
    sends: Vec<Option<(u32, u32)>>,
    counts: Vec<usize>,
}

impl SendPlan {
    /// Plans `ids` (`[n, top_k]`, validated expert ids) over `placement`'s EP ranks.
    pub fn new(ids: &[i32], top_k: usize, placement: &ExpertPlacement) -> Self {
        let mut counts = vec![0usize; placement.ep_size()];
        let mut sends = vec![None; ids.len()];
        for (token_ids, token_sends) in ids.chunks_exact(top_k).zip(sends.chunks_exact_mut(top_k)) {
            for k in 0..top_k {
                let target = placement.owner(token_ids[k] as usize);
                let seen = token_ids[..k].iter().any(|&e| placement.owner(e as usize) == target);
                if !seen {
                    token_sends[k] = Some((target as u32, counts[target] as u32));
                    counts[target] += 1;
                }
            }
        }
        SendPlan { top_k, sends, counts }
    }

    /// Tokens sent to each rank.
    pub fn counts(&self) -> &[usize] {
        &self.counts
    }

    /// `(k, target, slot)` of every send of token `t`, in k order.
    pub fn sends_of(&self, t: usize) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        self.sends[t * self.top_k..(t + 1) * self.top_k]
            .iter()
            .enumerate()
            .filter_map(|(k, s)| s.map(|(r, slot)| (k, r as usize, slot as usize)))
    }

    /// Number of tokens planned.
    pub fn num_tokens(&self) -> usize {
        self.sends.len() / self.top_k.max(1)
    }
}

/// Rewrites one received top-k row for `rank`: ids `rank` does not own become `-1` with weight
/// `0.0` (the contract's convention).
pub fn mask_foreign(ids: &mut [i32], weights: &mut [f32], rank: usize, placement: &ExpertPlacement) {
    for (id, w) in ids.iter_mut().zip(weights.iter_mut()) {
        if *id < 0 || placement.owner(*id as usize) != rank {
            *id = -1;
            *w = 0.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn routing() -> impl Strategy<Value = (usize, usize, usize, Vec<Vec<i32>>)> {
        (1usize..9, 1usize..6, 1usize..40).prop_flat_map(|(ep, top_k, n)| {
            let experts = (top_k.max(ep)..=3 * ep.max(top_k)).boxed();
            experts.prop_flat_map(move |e| {
                let token = proptest::sample::subsequence((0..e as i32).collect::<Vec<_>>(), top_k).prop_shuffle();
                (Just(ep), Just(top_k), Just(e), proptest::collection::vec(token, n))
            })
        })
    }

    proptest! {
        #[test]
        fn each_token_reaches_each_owner_rank_exactly_once((ep, top_k, e, tokens) in routing()) {
            let placement = ExpertPlacement::contiguous(e, ep);
            let ids: Vec<i32> = tokens.concat();
            let plan = SendPlan::new(&ids, top_k, &placement);
            for (t, row) in tokens.iter().enumerate() {
                let mut want: Vec<usize> = row.iter().map(|&x| placement.owner(x as usize)).collect();
                want.sort();
                want.dedup();
                let mut got: Vec<usize> = plan.sends_of(t).map(|(_, r, _)| r).collect();
                got.sort();
                prop_assert_eq!(got, want);
            }
        }

        #[test]
        fn slots_of_each_rank_are_dense_and_in_token_order((ep, top_k, e, tokens) in routing()) {
            let placement = ExpertPlacement::contiguous(e, ep);
            let ids: Vec<i32> = tokens.concat();
            let plan = SendPlan::new(&ids, top_k, &placement);
            let mut seen: Vec<Vec<usize>> = vec![Vec::new(); ep];
            for t in 0..plan.num_tokens() {
                for (_, r, slot) in plan.sends_of(t) {
                    seen[r].push(slot);
                }
            }
            for (r, slots) in seen.iter().enumerate() {
                prop_assert_eq!(slots.len(), plan.counts()[r]);
                prop_assert!(slots.iter().enumerate().all(|(i, s)| i == *s), "rank {} slots {:?}", r, slots);
            }
        }

        #[test]
        fn masking_keeps_exactly_the_owned_ids((ep, top_k, e, tokens) in routing()) {
            let placement = ExpertPlacement::contiguous(e, ep);
            for row in &tokens {
                for rank in 0..ep {
                    let mut ids = row.clone();
                    let mut w = vec![0.5f32; top_k];
                    mask_foreign(&mut ids, &mut w, rank, &placement);
                    for k in 0..top_k {
                        let owned = placement.owner(row[k] as usize) == rank;
                        prop_assert_eq!(ids[k], if owned { row[k] } else { -1 });
                        prop_assert_eq!(w[k], if owned { 0.5 } else { 0.0 });
                    }
                }
            }
        }
    }

    #[test]
    fn a_token_with_all_experts_on_one_rank_is_sent_once() {
        let placement = ExpertPlacement::contiguous(8, 2);
        let plan = SendPlan::new(&[4, 5, 6, 7], 4, &placement);
        assert_eq!(plan.sends_of(0).collect::<Vec<_>>(), [(0, 1, 0)]);
        assert_eq!(plan.counts(), [0, 1]);
    }
}
