//! Byte-level mutations of header text for the differential proptests (the fast parsers and
//! scans against the reference parser): delete, insert, replace or truncate at a position.

use proptest::prelude::*;

/// One edit; positions are taken modulo the current length.
#[derive(Debug, Clone)]
pub enum Mutation {
    Delete(usize),
    Insert(usize, u8),
    Replace(usize, u8),
    Truncate(usize),
}

/// An edit whose inserted or replacing byte comes from `byte`.
pub fn mutation<S>(byte: S) -> impl Strategy<Value = Mutation>
where
    S: Strategy<Value = u8> + Clone + 'static,
{
    prop_oneof![
        any::<usize>().prop_map(Mutation::Delete),
        (any::<usize>(), byte.clone()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<usize>(), byte).prop_map(|(i, b)| Mutation::Replace(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

/// `bytes` with every edit applied in order.
pub fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let n = bytes.len();
        match *m {
            Mutation::Delete(i) if n > 0 => {
                bytes.remove(i % n);
            }
            Mutation::Insert(i, b) => bytes.insert(i % (n + 1), b),
            Mutation::Replace(i, b) if n > 0 => bytes[i % n] = b,
            Mutation::Truncate(i) => bytes.truncate(i % (n + 1)),
            _ => {}
        }
    }
    bytes
}
