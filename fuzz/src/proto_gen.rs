//! Structured protobuf inputs: any message type of the agent protocol, generated field by field
//! through rust-protobuf's reflection from an [`arbitrary::Unstructured`] (the fuzz input's
//! bytes), so a crash's bytes regenerate the same message. Integers favour boundary values and
//! strings favour the words the code under test matches on (the caller's dictionary).
//!
//! Depends on `protobuf` and `arbitrary` only: the agent includes it with `#[path]` too.

#![allow(dead_code)]

use arbitrary::{Result, Unstructured};
use protobuf::reflect::{MessageDescriptor, ReflectValueBox, RuntimeFieldType, RuntimeType};
use protobuf::MessageDyn;

const INTS: &[i64] = &[
    0,
    1,
    -1,
    2,
    10,
    255,
    256,
    1000,
    1024,
    4096,
    65535,
    65536,
    1_000_000,
    i32::MAX as i64,
    i32::MIN as i64,
    u32::MAX as i64,
    i64::MAX,
    i64::MIN,
];

fn int(u: &mut Unstructured) -> Result<i64> {
    if u.ratio(2, 3)? {
        Ok(*u.choose(INTS)?)
    } else {
        u.arbitrary()
    }
}

fn uint(u: &mut Unstructured) -> Result<u64> {
    if u.ratio(2, 3)? {
        Ok(*u.choose(&[0u64, 1, 2, 4096, 1 << 20, 1 << 32, u32::MAX as u64, u64::MAX / 2, u64::MAX - 1, u64::MAX])?)
    } else {
        u.arbitrary()
    }
}

/// A string: a dictionary word (sometimes with a suffix), or arbitrary UTF-8.
pub fn string(u: &mut Unstructured, dict: &[&str]) -> Result<String> {
    if !dict.is_empty() && u.ratio(3, 4)? {
        let mut s = u.choose(dict)?.to_string();
        if u.ratio(1, 8)? {
            s.push_str(u.arbitrary::<&str>()?);
        }
        Ok(s)
    } else {
        let s: String = u.arbitrary()?;
        Ok(s.chars().take(256).collect())
    }
}

/// One value of runtime type `t`.
pub fn value(u: &mut Unstructured, t: &RuntimeType, dict: &[&str], depth: u32) -> Result<ReflectValueBox> {
    Ok(match t {
        RuntimeType::I32 => ReflectValueBox::I32(int(u)? as i32),
        RuntimeType::I64 => ReflectValueBox::I64(int(u)?),
        RuntimeType::U32 => ReflectValueBox::U32(uint(u)? as u32),
        RuntimeType::U64 => ReflectValueBox::U64(uint(u)?),
        RuntimeType::F32 => ReflectValueBox::F32(u.arbitrary()?),
        RuntimeType::F64 => ReflectValueBox::F64(u.arbitrary()?),
        RuntimeType::Bool => ReflectValueBox::Bool(u.arbitrary()?),
        RuntimeType::String => ReflectValueBox::String(string(u, dict)?),
        RuntimeType::VecU8 => {
            let n = u.int_in_range(0..=64)?;
            ReflectValueBox::Bytes(u.bytes(n.min(u.len()))?.to_vec())
        }
        RuntimeType::Enum(e) => {
            let n = if u.ratio(3, 4)? {
                let values: Vec<i32> = e.values().map(|v| v.value()).collect();
                *u.choose(&values)?
            } else {
                u.arbitrary()?
            };
            ReflectValueBox::Enum(e.clone(), n)
        }
        RuntimeType::Message(m) => ReflectValueBox::Message(message(u, m, dict, depth.saturating_sub(1))?),
    })
}

/// A message of type `d`, nested at most `depth` levels; each field is set or left default.
pub fn message(u: &mut Unstructured, d: &MessageDescriptor, dict: &[&str], depth: u32) -> Result<Box<dyn MessageDyn>> {
    let mut m = d.new_instance();
    if depth == 0 {
        return Ok(m);
    }
    for f in d.fields() {
        if u.is_empty() {
            break;
        }
        if !u.ratio(2, 3)? {
            continue;
        }
        match f.runtime_field_type() {
            RuntimeFieldType::Singular(t) => {
                let v = value(u, &t, dict, depth)?;
                f.set_singular_field(&mut *m, v);
            }
            RuntimeFieldType::Repeated(t) => {
                let n = u.int_in_range(0..=4u8)?;
                for _ in 0..n {
                    let v = value(u, &t, dict, depth)?;
                    f.mut_repeated(&mut *m).push(v);
                }
            }
            RuntimeFieldType::Map(k, t) => {
                let n = u.int_in_range(0..=4u8)?;
                for _ in 0..n {
                    let key = value(u, &k, dict, depth)?;
                    let v = value(u, &t, dict, depth)?;
                    f.mut_map(&mut *m).insert(key, v);
                }
            }
        }
    }
    Ok(m)
}

/// A message of type `d` from the whole input (a default message when the bytes run out early).
pub fn from_bytes(data: &[u8], d: &MessageDescriptor, dict: &[&str], depth: u32) -> Box<dyn MessageDyn> {
    let mut u = Unstructured::new(data);
    message(&mut u, d, dict, depth).unwrap_or_else(|_| d.new_instance())
}

/// One reflective mutation somewhere in `m`: a field at a random depth gets a new value or is
/// cleared, or a repeated/map field gains an element or is emptied. Starting from a realistic
/// message, this keeps inputs valid protobuf while varying what the code under test sees.
pub fn mutate(u: &mut Unstructured, m: &mut dyn MessageDyn, dict: &[&str], depth: u32) -> Result<()> {
    let fields: Vec<_> = m.descriptor_dyn().fields().collect();
    if fields.is_empty() {
        return Ok(());
    }
    let f = u.choose(&fields)?.clone();
    match f.runtime_field_type() {
        RuntimeFieldType::Singular(t) => {
            let descend = matches!(t, RuntimeType::Message(_)) && depth > 0 && u.ratio(3, 4)?;
            if descend {
                // `mut_message` creates the sub-message when absent.
                return mutate(u, f.mut_message(m), dict, depth - 1);
            }
            if u.ratio(1, 4)? {
                f.clear_field(m);
            } else {
                let v = value(u, &t, dict, 3)?;
                f.set_singular_field(m, v);
            }
        }
        RuntimeFieldType::Repeated(t) => {
            let len = f.get_repeated(m).len();
            let is_message = matches!(t, RuntimeType::Message(_));
            match u.int_in_range(0..=5u8)? {
                0..=2 if len > 0 => {
                    let i = u.choose_index(len)?;
                    let new = if is_message && depth > 0 {
                        let mut e = match f.get_repeated(m).get(i) {
                            protobuf::reflect::ReflectValueRef::Message(e) => e.clone_box(),
                            _ => unreachable!("a message list holds messages"),
                        };
                        mutate(u, &mut *e, dict, depth - 1)?;
                        ReflectValueBox::Message(e)
                    } else {
                        value(u, &t, dict, 3)?
                    };
                    f.mut_repeated(m).set(i, new);
                }
                3 if len > 0 => {
                    // Duplicate an element.
                    let i = u.choose_index(len)?;
                    let e = f.get_repeated(m).get(i).to_box();
                    f.mut_repeated(m).push(e);
                }
                4 => f.mut_repeated(m).clear(),
                _ => {
                    let v = value(u, &t, dict, 3)?;
                    f.mut_repeated(m).push(v);
                }
            }
        }
        RuntimeFieldType::Map(k, t) => {
            if u.ratio(1, 5)? {
                f.mut_map(m).clear();
            } else {
                let key = value(u, &k, dict, 2)?;
                let v = value(u, &t, dict, 3)?;
                f.mut_map(m).insert(key, v);
            }
        }
    }
    Ok(())
}

/// `base` after 1 to 8 [`mutate`] steps driven by the input.
pub fn mutated(data: &[u8], base: &dyn MessageDyn, dict: &[&str], depth: u32) -> Box<dyn MessageDyn> {
    let mut u = Unstructured::new(data);
    let mut m = base.clone_box();
    let steps = u.int_in_range(1..=8u8).unwrap_or(1);
    for _ in 0..steps {
        if mutate(&mut u, &mut *m, dict, depth).is_err() {
            break;
        }
    }
    m
}
