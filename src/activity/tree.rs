//! The blocking tree: who waits for whom, built from `pg_blocking_pids(pid)` of
//! every waiting session.
//!
//! Roots are sessions that block others and are not themselves blocked; under each
//! are the sessions it blocks, and so on. A session blocked by several others is
//! expanded under the first and listed again (not expanded) under the rest, so the
//! output stays as long as the number of edges. Sessions that wait for each other
//! in a cycle (a deadlock the server has not broken yet) have no root; one of them
//! is listed as a root marked `in_cycle`, and the walk stops where it comes back.

use std::collections::{BTreeMap, BTreeSet, HashSet};

/// One line of the flattened tree, in display order (depth first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeNode {
    pub pid: i32,
    /// The session it is listed under (one that blocks it); `None` for roots.
    pub parent: Option<i32>,
    pub depth: usize,
    /// Already listed, with what it blocks, higher up: shown again, not expanded.
    pub repeated: bool,
    /// Part of a cycle of sessions waiting for each other.
    pub in_cycle: bool,
}

/// Flattens the tree. `waits` has, for each blocked session, the sessions blocking
/// it (as `pg_blocking_pids` returns them); sessions blocked by nobody may be left
/// out or given an empty list.
pub fn build(waits: &[(i32, Vec<i32>)]) -> Vec<TreeNode> {
    // blocker -> the sessions it blocks, and blocked -> its blockers; both ordered so
    // the output is stable from one refresh to the next.
    let mut children: BTreeMap<i32, BTreeSet<i32>> = BTreeMap::new();
    let mut blockers: BTreeMap<i32, BTreeSet<i32>> = BTreeMap::new();
    for (pid, by) in waits {
        for b in by {
            if b != pid {
                children.entry(*b).or_default().insert(*pid);
                blockers.entry(*pid).or_default().insert(*b);
            }
        }
    }
    let mut out = Vec::new();
    let mut expanded = HashSet::new();
    for root in children.keys().filter(|p| !blockers.contains_key(p)) {
        walk(*root, false, &children, &mut expanded, &mut out);
    }
    // Whatever is left waits, through its blockers, on a cycle.
    for pid in blockers.keys() {
        if expanded.contains(pid) {
            continue;
        }
        let start = cycle_member(*pid, &blockers);
        walk(start, true, &children, &mut expanded, &mut out);
    }
    out
}

/// Follows blockers upwards from `pid` until a session comes round again: that one
/// is on a cycle. (Called only for sessions no root reaches, so a cycle is there.)
fn cycle_member(pid: i32, blockers: &BTreeMap<i32, BTreeSet<i32>>) -> i32 {
    let mut seen = HashSet::new();
    let mut p = pid;
    while seen.insert(p) {
        match blockers.get(&p).and_then(|b| b.first()) {
            Some(next) => p = *next,
            None => return p,
        }
    }
    p
}

/// Depth-first walk from `root`, without recursion (chains can be long).
fn walk(
    root: i32,
    root_in_cycle: bool,
    children: &BTreeMap<i32, BTreeSet<i32>>,
    expanded: &mut HashSet<i32>,
    out: &mut Vec<TreeNode>,
) {
    enum Step {
        Enter {
            pid: i32,
            parent: Option<i32>,
            depth: usize,
        },
        Leave(i32),
    }
    // The sessions from the root down to here, to notice a cycle.
    let mut path: HashSet<i32> = HashSet::new();
    let mut stack = vec![Step::Enter {
        pid: root,
        parent: None,
        depth: 0,
    }];
    while let Some(step) = stack.pop() {
        let (pid, parent, depth) = match step {
            Step::Leave(pid) => {
                path.remove(&pid);
                continue;
            }
            Step::Enter { pid, parent, depth } => (pid, parent, depth),
        };
        let on_path = path.contains(&pid);
        let repeated = on_path || expanded.contains(&pid);
        out.push(TreeNode {
            pid,
            parent,
            depth,
            repeated,
            in_cycle: on_path || (depth == 0 && root_in_cycle),
        });
        if repeated {
            continue;
        }
        expanded.insert(pid);
        path.insert(pid);
        stack.push(Step::Leave(pid));
        if let Some(kids) = children.get(&pid) {
            for kid in kids.iter().rev() {
                stack.push(Step::Enter {
                    pid: *kid,
                    parent: Some(pid),
                    depth: depth + 1,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(pid, parent, depth, repeated, in_cycle)` of each line.
    fn lines(waits: &[(i32, Vec<i32>)]) -> Vec<(i32, Option<i32>, usize, bool, bool)> {
        build(waits)
            .into_iter()
            .map(|n| (n.pid, n.parent, n.depth, n.repeated, n.in_cycle))
            .collect()
    }

    #[test]
    fn nobody_waiting_gives_an_empty_tree() {
        assert!(build(&[]).is_empty());
        assert!(build(&[(5, vec![]), (6, vec![])]).is_empty());
    }

    #[test]
    fn a_chain_is_one_branch_from_the_session_nobody_blocks() {
        // 3 waits for 2, which waits for 1.
        assert_eq!(
            lines(&[(3, vec![2]), (2, vec![1])]),
            vec![
                (1, None, 0, false, false),
                (2, Some(1), 1, false, false),
                (3, Some(2), 2, false, false),
            ]
        );
    }

    #[test]
    fn several_roots_each_get_their_tree_and_a_shared_victim_is_expanded_once() {
        // 10 blocks 11 and 12; 20 blocks 21; 30 waits for both 10 and 20, and 31
        // waits for 30.
        let waits = [
            (11, vec![10]),
            (12, vec![10]),
            (21, vec![20]),
            (30, vec![10, 20]),
            (31, vec![30]),
        ];
        assert_eq!(
            lines(&waits),
            vec![
                (10, None, 0, false, false),
                (11, Some(10), 1, false, false),
                (12, Some(10), 1, false, false),
                (30, Some(10), 1, false, false),
                (31, Some(30), 2, false, false),
                (20, None, 0, false, false),
                (21, Some(20), 1, false, false),
                (30, Some(20), 1, true, false),
            ]
        );
    }

    #[test]
    fn a_cycle_is_listed_once_from_one_of_its_members_and_the_walk_stops() {
        // 1 and 2 wait for each other; 3 waits for 1.
        assert_eq!(
            lines(&[(1, vec![2]), (2, vec![1]), (3, vec![1])]),
            vec![
                (1, None, 0, false, true),
                (2, Some(1), 1, false, false),
                (1, Some(2), 2, true, true),
                (3, Some(1), 1, false, false),
            ]
        );
    }

    #[test]
    fn a_session_downstream_of_a_cycle_is_not_made_a_root() {
        // 2 waits for 5; 5 and 6 wait for each other. 2 has the smallest pid, yet
        // the walk starts from a member of the cycle.
        let nodes = build(&[(2, vec![5]), (5, vec![6]), (6, vec![5])]);
        assert_eq!(nodes[0].depth, 0);
        assert!(nodes[0].in_cycle);
        assert!(nodes[0].pid == 5 || nodes[0].pid == 6, "{nodes:?}");
        let two = nodes.iter().find(|n| n.pid == 2).unwrap();
        assert_eq!(two.parent, Some(5));
        assert_eq!(nodes.iter().filter(|n| !n.repeated).count(), 3);
    }

    #[test]
    fn a_long_chain_does_not_overflow_the_stack() {
        let waits: Vec<(i32, Vec<i32>)> = (2..200_000).map(|p| (p, vec![p - 1])).collect();
        let nodes = build(&waits);
        assert_eq!(nodes.len(), 199_999);
        assert_eq!(nodes.last().unwrap().depth, 199_998);
    }

    #[test]
    fn a_session_listed_as_blocking_itself_is_ignored() {
        assert!(build(&[(4, vec![4])]).is_empty());
    }
}
