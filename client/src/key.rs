//! Lock names: text checked and hashed on each call, or a [`Key`] checked
//! and hashed once, which also remembers where the table keeps it.
//!
//! Every call that takes a lock accepts either (`impl LockName`): a `&str`,
//! `String`, `&[u8]`, `Vec<u8>` or anything else that is `AsRef<[u8]>`, or a
//! `&Key`. A `Key` saves a prepared acquire the name's check, its hash and
//! the table lookup (the hash probe and a key comparison): about a quarter
//! of the call, for code that takes the same lock in a loop.

use crate::error::Error;
use shm_layout::lockword::Word;
use shm_layout::table::TableView;
use shm_layout::{key_hash, validate_key};
use std::sync::atomic::{AtomicU64, Ordering};

/// A lock name checked and hashed once: `let key = Key::new("orders/42")?;`
/// then `client.lock(&key)` as often as needed.
///
/// It remembers the slot the table last kept its name in (a hint, never
/// trusted: a grant made through it is checked against the slot's key, as
/// every fast-path grant is), so it can be shared between threads and used
/// with any [`crate::Client`].
pub struct Key {
    name: Box<[u8]>,
    hash: u64,
    /// `slot << 16 | generation` of the slot and word generation where the
    /// name was last found, or [`NO_HINT`].
    hint: AtomicU64,
}

/// [`Key::hint`] before the first lookup.
const NO_HINT: u64 = u64::MAX;

impl Key {
    /// Check `name` (1 to [`crate::MAX_KEY_LEN`] bytes, no NUL) and hash it.
    pub fn new(name: impl AsRef<[u8]>) -> Result<Key, Error> {
        let name = name.as_ref();
        validate_key(name)?;
        Ok(Key {
            name: name.into(),
            hash: key_hash(name),
            hint: AtomicU64::new(NO_HINT),
        })
    }

    /// The name's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.name
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Key")
            .field(&String::from_utf8_lossy(&self.name))
            .finish()
    }
}

/// What a lock call takes as a name: text (`AsRef<[u8]>`) or a [`Key`].
/// Sealed: implemented here only.
pub trait LockName: sealed::Sealed {
    #[doc(hidden)]
    fn lock_name(&self) -> Result<Name<'_>, Error>;
}

mod sealed {
    pub trait Sealed {}
    impl<T: AsRef<[u8]> + ?Sized> Sealed for T {}
    impl Sealed for super::Key {}
    impl Sealed for &super::Key {}
}

impl<T: AsRef<[u8]> + ?Sized> LockName for T {
    #[inline]
    fn lock_name(&self) -> Result<Name<'_>, Error> {
        let bytes = self.as_ref();
        validate_key(bytes)?;
        Ok(Name {
            bytes,
            hash: key_hash(bytes),
            hint: None,
        })
    }
}

impl LockName for Key {
    #[inline]
    fn lock_name(&self) -> Result<Name<'_>, Error> {
        Ok(Name {
            bytes: &self.name,
            hash: self.hash,
            hint: Some(&self.hint),
        })
    }
}

impl LockName for &Key {
    #[inline]
    fn lock_name(&self) -> Result<Name<'_>, Error> {
        (*self).lock_name()
    }
}

/// A checked name, its hash and, for a [`Key`], its slot hint.
#[doc(hidden)]
#[derive(Clone, Copy)]
pub struct Name<'a> {
    pub(crate) bytes: &'a [u8],
    pub(crate) hash: u64,
    hint: Option<&'a AtomicU64>,
}

impl Name<'_> {
    /// Where the table keeps this name: the slot and the word seen there
    /// (whose generation the grant's CAS will expect). From the hint when
    /// the slot's word generation is still the one it was found with, else
    /// from the table's index (and the hint is updated). `None`: not in the
    /// table.
    ///
    /// A hinted slot can hold another name only if its generation (16
    /// bits) wrapped since; the fast path compares the key after its CAS
    /// for exactly that case ([`crate::mapped::fast_acquire_seen`]), so the
    /// hint needs no other check.
    #[inline]
    pub(crate) fn find(&self, table: &TableView) -> Option<(u32, Word)> {
        if let Some(hint) = self.hint {
            // Relaxed: the hint is a guess; what it names is checked.
            let packed = hint.load(Ordering::Relaxed);
            if packed != NO_HINT {
                let slot = (packed >> 16) as u32;
                if let Some(s) = table.slot(slot) {
                    // SYNC POINT: Acquire pairs with the broker's Release
                    // store of the word, as in `TableView::lookup`.
                    let word = s.word_acquire();
                    if word.generation() == packed as u16 {
                        return Some((slot, word));
                    }
                }
            }
        }
        let (slot, word) = table.lookup(self.bytes, self.hash)?;
        if let Some(hint) = self.hint {
            hint.store(
                u64::from(slot) << 16 | u64::from(word.generation()),
                Ordering::Relaxed,
            );
        }
        Some((slot, word))
    }
}
