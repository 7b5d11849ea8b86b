//! A pre-scan of a pickle's opcodes that bounds what decoding it will cost, before
//! `serde-pickle` decodes it.
//!
//! `serde-pickle` builds the whole object tree in memory, recursively, and copies a value
//! each time the stream refers to it again (`DUP`, and `GET` of the memo, which PyTorch's
//! snapshots use for every shared frame and string). A few KB of opcodes can therefore ask
//! for gigabytes (a list that is `DUP`ed and `APPENDS`ed into itself doubles at each step),
//! or nest deep enough to overflow the stack when the tree is built or dropped. This scan
//! walks the opcodes with a stack of (cost, depth) instead of values: each value's cost is
//! what a full copy of it takes, so the sum of every push, copies included, bounds the
//! memory decoding takes, and each value's depth bounds the recursion. A length prefix that
//! points past the end of the data is refused here too, before any buffer is sized by it.

use std::collections::HashMap;

/// The deepest nesting of containers accepted. PyTorch's snapshots nest about 6 deep.
pub(super) const MAX_DEPTH: u32 = 200;

/// What one value costs, at least, in bytes of the decoded tree (`serde_pickle::Value` and
/// its place in a container).
const VALUE_COST: u64 = 48;

/// A value on the stack, as the scan sees it.
#[derive(Clone, Copy)]
struct Item {
    /// Bytes a full copy of it takes.
    cost: u64,
    /// How deep containers nest in it.
    depth: u32,
    /// The memo entry it is (serde-pickle keeps a memo'd value in the memo and a reference
    /// on the stack, so a container filled after it was memo'd grows in the memo).
    alias: Option<u64>,
}

const LEAF: Item = Item { cost: VALUE_COST, depth: 0, alias: None };

fn leaf(bytes: u64) -> Item {
    Item { cost: VALUE_COST.saturating_add(bytes), ..LEAF }
}

/// Scans pickle `data`: the bytes decoding it takes at most, or where and why decoding it
/// would exceed `budget` bytes or [`MAX_DEPTH`], or is malformed in a way that decoding
/// would find only late.
pub(super) fn scan(data: &[u8], budget: u64) -> Result<u64, (usize, String)> {
    let mut s =
        Scan { data, pos: 0, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new(), spent: 0, budget };
    s.run()
}

struct Scan<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Item>,
    marks: Vec<usize>,
    /// Memo entries by id.
    memo: HashMap<u64, Item>,
    spent: u64,
    budget: u64,
}

impl Scan<'_> {
    fn fail<T>(&self, msg: impl Into<String>) -> Result<T, (usize, String)> {
        Err((self.pos, msg.into()))
    }

    fn take(&mut self, n: u64) -> Result<&[u8], (usize, String)> {
        let left = (self.data.len() - self.pos) as u64;
        if n > left {
            return self.fail(format!("a length of {n} bytes runs past the end of the data ({left} left)"));
        }
        let out = &self.data[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(out)
    }

    fn uint(&mut self, n: usize) -> Result<u64, (usize, String)> {
        let b = self.take(n as u64)?;
        Ok(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64))
    }

    fn line(&mut self) -> Result<&[u8], (usize, String)> {
        let rest = &self.data[self.pos..];
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return self.fail("a text argument without its end of line");
        };
        self.pos += end + 1;
        Ok(&rest[..end])
    }

    fn push(&mut self, item: Item) -> Result<(), (usize, String)> {
        if item.depth > MAX_DEPTH {
            return self.fail(format!("nested more than {MAX_DEPTH} deep"));
        }
        self.spent = self.spent.saturating_add(item.cost);
        if self.spent > self.budget {
            return self.fail(format!(
                "decoding it would take more than {} MiB (its shared objects copied where they are used)",
                self.budget >> 20
            ));
        }
        self.stack.push(item);
        Ok(())
    }

    fn pop(&mut self) -> Result<Item, (usize, String)> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.fail("an opcode with too few values on the stack");
        }
        Ok(self.stack.pop().expect("checked above"))
    }

    /// Pops everything down to the last mark, and the mark.
    fn pop_mark(&mut self) -> Result<Item, (usize, String)> {
        let Some(m) = self.marks.pop() else {
            return self.fail("an opcode that needs a mark, with none set");
        };
        let items = self.stack.split_off(m);
        Ok(combine(&items))
    }

    /// A new value made of `parts`.
    fn build(&mut self, parts: Item) -> Result<(), (usize, String)> {
        self.push(Item { cost: VALUE_COST.saturating_add(parts.cost), depth: parts.depth + 1, alias: None })
    }

    /// Adds `parts` to the container on top of the stack (it grows in place: no new push).
    fn extend_top(&mut self, parts: Item) -> Result<(), (usize, String)> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.fail("an opcode that adds to a container, with none on the stack");
        }
        let top = self.stack.last_mut().expect("checked above");
        top.cost = top.cost.saturating_add(parts.cost);
        top.depth = top.depth.max(parts.depth + 1);
        let top = *top;
        if top.depth > MAX_DEPTH {
            return self.fail(format!("nested more than {MAX_DEPTH} deep"));
        }
        // the items were counted when pushed (their growth is where they went), but copies
        // of the container made later count its new size
        if let Some(slot) = top.alias.and_then(|id| self.memo.get_mut(&id)) {
            *slot = top;
        }
        Ok(())
    }

    fn memo_put(&mut self, id: u64) -> Result<(), (usize, String)> {
        if self.stack.is_empty() {
            return self.fail("a memo store with an empty stack");
        }
        let top = self.stack.last_mut().expect("checked above");
        top.alias = Some(id);
        self.memo.insert(id, *top);
        Ok(())
    }

    fn memo_get(&mut self, id: u64) -> Result<(), (usize, String)> {
        match self.memo.get(&id).copied() {
            // a copy of the whole value, as serde-pickle makes it
            Some(item) => self.push(item),
            None => self.fail(format!("a memo reference to {id}, which was never stored")),
        }
    }

    fn text_memo_id(&mut self) -> Result<u64, (usize, String)> {
        let line = self.line()?;
        match std::str::from_utf8(line).ok().and_then(|s| s.trim().parse::<u64>().ok()) {
            Some(id) => Ok(id),
            None => self.fail("a memo index that is not a number"),
        }
    }

    fn run(&mut self) -> Result<u64, (usize, String)> {
        loop {
            let at = self.pos;
            let Some(&op) = self.data.get(at) else {
                return self.fail("the data ends before the pickle's STOP opcode");
            };
            self.pos += 1;
            match op {
                b'.' => return Ok(self.spent), // STOP
                b'(' => self.marks.push(self.stack.len()),
                b'0' => drop(self.pop()?),
                b'1' => drop(self.pop_mark()?),
                b'2' => {
                    let top = self.pop()?;
                    self.stack.push(top);
                    self.push(top)?;
                }
                // numbers, text and bytes: leaves
                b'F' | b'I' | b'L' | b'S' | b'V' => {
                    let n = self.line()?.len() as u64;
                    self.push(leaf(n))?;
                }
                b'J' => drop(self.take(4)?),
                b'K' => drop(self.take(1)?),
                b'M' => drop(self.take(2)?),
                b'G' => drop(self.take(8)?),
                b'N' | 0x88 | 0x89 | b'}' | b']' | b')' | 0x8f => {}
                b'T' | b'X' | b'B' => {
                    let n = self.uint(4)?;
                    self.take(n)?;
                    self.push(leaf(n))?;
                }
                b'U' | b'C' | 0x8c | 0x8a => {
                    let n = self.uint(1)?;
                    self.take(n)?;
                    self.push(leaf(n))?;
                }
                0x8b | 0x8d | 0x8e | 0x96 => {
                    let n = self.uint(if op == 0x8b { 4 } else { 8 })?;
                    self.take(n)?;
                    self.push(leaf(n))?;
                }
                b'P' => {
                    self.line()?;
                }
                b'Q' | 0x98 => {
                    let x = self.pop()?;
                    self.build(x)?;
                }
                b'R' | 0x81 | 0x93 => {
                    let (b, a) = (self.pop()?, self.pop()?);
                    self.build(combine(&[a, b]))?;
                }
                0x92 => {
                    let (c, b, a) = (self.pop()?, self.pop()?, self.pop()?);
                    self.build(combine(&[a, b, c]))?;
                }
                b'a' | b'b' => {
                    let x = self.pop()?;
                    self.extend_top(x)?;
                }
                b's' => {
                    let (v, k) = (self.pop()?, self.pop()?);
                    self.extend_top(combine(&[k, v]))?;
                }
                b'e' | b'u' | 0x90 => {
                    let parts = self.pop_mark()?;
                    self.extend_top(parts)?;
                }
                b'c' => {
                    self.line()?;
                    self.line()?;
                }
                b'i' => {
                    self.line()?;
                    self.line()?;
                    let parts = self.pop_mark()?;
                    self.build(parts)?;
                }
                b'd' | b'l' | b't' | b'o' | 0x91 => {
                    let parts = self.pop_mark()?;
                    self.build(parts)?;
                }
                0x85 => {
                    let a = self.pop()?;
                    self.build(a)?;
                }
                0x86 => {
                    let (b, a) = (self.pop()?, self.pop()?);
                    self.build(combine(&[a, b]))?;
                }
                0x87 => {
                    let (c, b, a) = (self.pop()?, self.pop()?, self.pop()?);
                    self.build(combine(&[a, b, c]))?;
                }
                b'g' => {
                    let id = self.text_memo_id()?;
                    self.memo_get(id)?;
                }
                b'h' => {
                    let id = self.uint(1)?;
                    self.memo_get(id)?;
                }
                b'j' => {
                    let id = self.uint(4)?;
                    self.memo_get(id)?;
                }
                b'p' => {
                    let id = self.text_memo_id()?;
                    self.memo_put(id)?;
                }
                b'q' => {
                    let id = self.uint(1)?;
                    self.memo_put(id)?;
                }
                b'r' => {
                    let id = self.uint(4)?;
                    self.memo_put(id)?;
                }
                0x94 => {
                    let id = self.memo.len() as u64;
                    self.memo_put(id)?;
                }
                0x80 => drop(self.take(1)?), // PROTO
                0x95 => drop(self.take(8)?), // FRAME: a hint, the opcodes follow as usual
                0x82 => drop(self.take(1)?),
                0x83 => drop(self.take(2)?),
                0x84 => drop(self.take(4)?),
                0x97 => {}
                _ => {
                    self.pos = at;
                    return self.fail(format!("unknown pickle opcode {op:#04x}"));
                }
            }
            // the leaf and empty-container opcodes above that push nothing themselves
            if matches!(
                op,
                b'J' | b'K'
                    | b'M'
                    | b'G'
                    | b'N'
                    | 0x88
                    | 0x89
                    | b'}'
                    | b']'
                    | b')'
                    | 0x8f
                    | b'P'
                    | b'c'
                    | 0x82
                    | 0x83
                    | 0x84
                    | 0x97
            ) {
                self.push(LEAF)?;
            }
        }
    }
}

/// The cost and depth of values taken together (the parts of a new container).
fn combine(items: &[Item]) -> Item {
    items.iter().fold(Item { cost: 0, depth: 0, alias: None }, |acc, i| Item {
        cost: acc.cost.saturating_add(i.cost),
        depth: acc.depth.max(i.depth),
        alias: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BIG: u64 = 1 << 30;

    #[test]
    fn a_real_snapshot_passes() {
        let data =
            std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/snapshot_sample.pickle"))
                .unwrap();
        let spent = scan(&data, BIG).unwrap();
        // what the budget of pickle.rs allows for, with room to spare
        assert!(spent < 64 * data.len() as u64, "{spent} for {} bytes", data.len());
    }

    #[test]
    fn a_list_that_doubles_by_dup_is_refused() {
        // PROTO 2, EMPTY_LIST, then 64 times: MARK DUP APPENDS... no: DUP the list, then
        // wrap both in a tuple, which doubles the cost each time
        let mut p = vec![0x80, 2, b']'];
        for _ in 0..64 {
            p.extend([b'2', 0x86]);
        }
        p.push(b'.');
        let (_, m) = scan(&p, BIG).unwrap_err();
        assert!(m.contains("MiB"), "{m}");
    }

    #[test]
    fn memo_gets_count_as_copies() {
        let mut p = vec![0x80, 2, b']', b'q', 0];
        for _ in 0..64 {
            // get the memo'd list twice, pair them, store the pair over it
            p.extend([b'h', 0, b'h', 0, 0x86, b'q', 0]);
        }
        p.push(b'.');
        assert!(scan(&p, BIG).is_err());
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', 100_000));
        p.extend(std::iter::repeat_n(b'a', 99_999));
        p.push(b'.');
        let (_, m) = scan(&p, BIG).unwrap_err();
        assert!(m.contains("nested"), "{m}");
        // tuples of one, built bottom up
        let mut p = vec![0x80, 2, b'N'];
        p.extend(std::iter::repeat_n(0x85, 100_000));
        p.push(b'.');
        assert!(scan(&p, BIG).unwrap_err().1.contains("nested"));
    }

    #[test]
    fn lengths_past_the_end_are_refused() {
        let p = [0x80, 4, 0x8d, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, b'.'];
        assert!(scan(&p, BIG).unwrap_err().1.contains("past the end"));
    }
}
