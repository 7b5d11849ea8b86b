//! The call stacks of a snapshot pickle's `device_traces` entries.
//!
//! `serde-pickle` cannot give them: PyTorch shares every frame and string of a snapshot
//! through the pickle's memo, and `serde-pickle`, told to replace such shared values so that
//! it reads the rest, replaces them with `None` (a frame comes back as `{None: 0}`). This
//! module runs the pickle's opcodes itself, with the memo's values shared as the pickle
//! shares them, and reads only the frames. It runs after `serde-pickle` read the events and
//! after the scan bounded what decoding costs; anything it does not understand gives no
//! frames rather than an error, since frames are optional.

use gpumem::{Frame, Frames};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// A dict's items, shared as the memo shares them.
type Items = RefCell<Vec<(V, V)>>;

/// A decoded value; containers are shared, as the memo shares them.
#[derive(Clone)]
enum V {
    Int(i64),
    Str(Rc<str>),
    List(Rc<RefCell<Vec<V>>>),
    Dict(Rc<Items>),
    /// Anything else (None, bools, floats, bytes, tuples, objects).
    Other,
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<V>,
    marks: Vec<usize>,
    memo: HashMap<u64, V>,
}

impl Vm<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.data.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    fn uint(&mut self, n: usize) -> Option<u64> {
        Some(self.take(n)?.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64))
    }

    fn line(&mut self) -> Option<&[u8]> {
        let rest = self.data.get(self.pos..)?;
        let end = rest.iter().position(|&b| b == b'\n')?;
        self.pos += end + 1;
        Some(&rest[..end])
    }

    fn pop(&mut self) -> Option<V> {
        if self.stack.len() <= self.marks.last().copied().unwrap_or(0) {
            return None;
        }
        self.stack.pop()
    }

    fn pop_mark(&mut self) -> Option<Vec<V>> {
        let m = self.marks.pop()?;
        (m <= self.stack.len()).then(|| self.stack.split_off(m))
    }

    fn string(&mut self, n: usize) -> Option<()> {
        let s = String::from_utf8_lossy(self.take(n)?).into_owned();
        self.stack.push(V::Str(Rc::from(s)));
        Some(())
    }

    fn set_items(&mut self, items: Vec<V>) -> Option<()> {
        let V::Dict(d) = self.stack.last()? else { return Some(()) };
        let mut d = d.borrow_mut();
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Some(())
    }

    fn append(&mut self, items: Vec<V>) -> Option<()> {
        if let V::List(l) = self.stack.last()? {
            l.borrow_mut().extend(items);
        }
        Some(())
    }

    fn run(&mut self) -> Option<V> {
        loop {
            let op = *self.take(1)?.first()?;
            match op {
                b'.' => return self.stack.pop(),
                0x80 => drop(self.take(1)?),
                0x95 => drop(self.take(8)?),
                b'(' => self.marks.push(self.stack.len()),
                b'}' => self.stack.push(V::Dict(Rc::default())),
                b']' => self.stack.push(V::List(Rc::default())),
                b')' => self.stack.push(V::Other),
                b'N' | 0x88 | 0x89 => self.stack.push(V::Other),
                0x8f => self.stack.push(V::Other),
                b'K' => {
                    let n = self.uint(1)? as i64;
                    self.stack.push(V::Int(n));
                }
                b'M' => {
                    let n = self.uint(2)? as i64;
                    self.stack.push(V::Int(n));
                }
                b'J' => {
                    let n = self.uint(4)? as u32 as i32 as i64;
                    self.stack.push(V::Int(n));
                }
                0x8a | 0x8b => {
                    let n = self.uint(if op == 0x8a { 1 } else { 4 })? as usize;
                    let b = self.take(n)?;
                    let v = if (1..=8).contains(&n) {
                        let mut x = b.iter().rev().fold(0i64, |acc, &x| (acc << 8) | x as i64);
                        if n < 8 && b[n - 1] & 0x80 != 0 {
                            x -= 1i64 << (8 * n);
                        }
                        V::Int(x)
                    } else {
                        V::Other
                    };
                    self.stack.push(v);
                }
                b'G' => {
                    self.take(8)?;
                    self.stack.push(V::Other);
                }
                0x8c => {
                    let n = self.uint(1)? as usize;
                    self.string(n)?;
                }
                b'X' => {
                    let n = self.uint(4)? as usize;
                    self.string(n)?;
                }
                0x8d => {
                    let n = usize::try_from(self.uint(8)?).ok()?;
                    self.string(n)?;
                }
                b'U' | b'C' => {
                    let n = self.uint(1)? as usize;
                    self.take(n)?;
                    self.stack.push(V::Other);
                }
                b'T' | b'B' => {
                    let n = self.uint(4)? as usize;
                    self.take(n)?;
                    self.stack.push(V::Other);
                }
                0x8e | 0x96 => {
                    let n = usize::try_from(self.uint(8)?).ok()?;
                    self.take(n)?;
                    self.stack.push(V::Other);
                }
                0x94 => {
                    let top = self.stack.last()?.clone();
                    self.memo.insert(self.memo.len() as u64, top);
                }
                b'q' | b'r' | b'p' => {
                    let id = match op {
                        b'q' => self.uint(1)?,
                        b'r' => self.uint(4)?,
                        _ => std::str::from_utf8(self.line()?).ok()?.trim().parse().ok()?,
                    };
                    let top = self.stack.last()?.clone();
                    self.memo.insert(id, top);
                }
                b'h' | b'j' | b'g' => {
                    let id = match op {
                        b'h' => self.uint(1)?,
                        b'j' => self.uint(4)?,
                        _ => std::str::from_utf8(self.line()?).ok()?.trim().parse().ok()?,
                    };
                    let v = self.memo.get(&id)?.clone();
                    self.stack.push(v);
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(V::List(Rc::new(RefCell::new(items))));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    self.stack.push(V::Dict(Rc::default()));
                    self.set_items(items)?;
                }
                b't' => {
                    self.pop_mark()?;
                    self.stack.push(V::Other);
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let at = self.stack.len().checked_sub(n)?;
                    self.stack.truncate(at);
                    self.stack.push(V::Other);
                }
                b'0' => drop(self.pop()?),
                b'1' => drop(self.pop_mark()?),
                b'2' => {
                    let top = self.stack.last()?.clone();
                    self.stack.push(top);
                }
                0x90 | 0x91 => {
                    self.pop_mark()?;
                    if op == 0x91 {
                        self.stack.push(V::Other);
                    }
                }
                b'c' => {
                    self.line()?;
                    self.line()?;
                    self.stack.push(V::Other);
                }
                0x93 | b'R' | 0x81 => {
                    self.pop()?;
                    self.pop()?;
                    self.stack.push(V::Other);
                }
                0x92 => {
                    self.pop()?;
                    self.pop()?;
                    self.pop()?;
                    self.stack.push(V::Other);
                }
                b'b' => drop(self.pop()?),
                _ => return None,
            }
        }
    }
}

fn get(d: &[(V, V)], key: &str) -> Option<V> {
    d.iter().find(|(k, _)| matches!(k, V::Str(s) if &**s == key)).map(|(_, v)| v.clone())
}

fn frame(v: &V) -> Option<Frame> {
    let V::Dict(d) = v else { return None };
    let d = d.borrow();
    let text = |k| match get(&d, k) {
        Some(V::Str(s)) => s.to_string(),
        _ => String::new(),
    };
    let line = match get(&d, "line") {
        Some(V::Int(l)) => u32::try_from(l).unwrap_or(0),
        _ => 0,
    };
    Some(Frame { filename: text("filename"), line, name: text("name") })
}

/// The stacks of the entries of the first device that has entries, in order, entries that
/// name no allocator action left out as the event reader leaves them out (`keep` says which
/// to keep, from the entry's action); `None` where the pickle has no frames or is not
/// understood.
pub(super) fn entry_frames(data: &[u8], keep: impl Fn(&str) -> bool) -> Option<Vec<Frames>> {
    let mut vm = Vm { data, pos: 0, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new() };
    let V::Dict(top) = vm.run()? else { return None };
    let V::List(devices) = get(&top.borrow(), "device_traces")? else { return None };
    let devices = devices.borrow();
    let entries = devices.iter().find_map(|d| match d {
        V::List(l) if !l.borrow().is_empty() => Some(l.clone()),
        _ => None,
    })?;
    let entries = entries.borrow();
    // PyTorch shares each frame (a dict) between stacks, not the stacks (lists) themselves:
    // one Frame per shared dict, and one Frames per distinct sequence of them, so that memory
    // grows with the distinct stacks and frames, not with the events
    let mut frames: HashMap<*const Items, Option<Frame>> = HashMap::new();
    let mut stacks: HashMap<Vec<*const Items>, Frames> = HashMap::new();
    let mut out = Vec::with_capacity(entries.len());
    let mut any = false;
    for e in entries.iter() {
        let V::Dict(d) = e else { return None };
        let d = d.borrow();
        match get(&d, "action") {
            Some(V::Str(a)) if keep(&a) => {}
            _ => continue,
        }
        let key: Vec<_> = match get(&d, "frames") {
            Some(V::List(l)) => l
                .borrow()
                .iter()
                .filter_map(|f| match f {
                    V::Dict(fd) => Some(Rc::as_ptr(fd)),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        let stack = match stacks.get(&key) {
            Some(s) => s.clone(),
            None => {
                let list: Vec<Frame> = match get(&d, "frames") {
                    Some(V::List(l)) => l
                        .borrow()
                        .iter()
                        .filter_map(|f| match f {
                            V::Dict(fd) => frames.entry(Rc::as_ptr(fd)).or_insert_with(|| frame(f)).clone(),
                            _ => None,
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                let s: Frames = list.into();
                stacks.insert(key, s.clone());
                s
            }
        };
        any |= !stack.is_empty();
        out.push(stack);
    }
    any.then_some(out)
}
