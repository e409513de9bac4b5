//! The install-code book, persisted: every change is flushed before it is acknowledged.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use de_install_codes::{Attempt, CodeBook, IssuedCode, Refusal};

use crate::store::{Store, StoreError, StoreExt, Tree};

const KEY: &str = "install-codes";

#[derive(Debug, thiserror::Error)]
pub enum CodesError {
    #[error("could not persist the install code")]
    Store(#[from] StoreError),
    #[error("could not generate an install code")]
    Code(#[from] de_install_codes::CodeError),
}

/// Why an attempt could not even begin.
#[derive(Debug)]
pub enum AttemptError {
    Refused(Refusal),
    Store(StoreError),
}

/// The controller's one code book.
pub struct Codes {
    book: Mutex<CodeBook>,
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for Codes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codes").finish_non_exhaustive()
    }
}

impl Codes {
    pub fn load(store: Arc<dyn Store>) -> Result<Codes, StoreError> {
        let book = store
            .get_json::<CodeBook>(Tree::Meta, KEY)?
            .unwrap_or_default();
        Ok(Codes {
            book: Mutex::new(book),
            store,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CodeBook> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self, book: &CodeBook) -> Result<(), StoreError> {
        self.store.put_json(Tree::Meta, KEY, book)
    }

    /// A new code replacing any other; durable when this returns.
    pub fn issue(&self, ttl: Duration) -> Result<IssuedCode, CodesError> {
        let mut book = self.lock();
        let mut next = book.clone();
        let issued = next.issue(SystemTime::now(), ttl)?;
        self.persist(&next)?;
        *book = next;
        Ok(issued)
    }

    pub fn active(&self) -> Option<IssuedCode> {
        self.lock().active(SystemTime::now())
    }

    /// Ends installation; durable when this returns.
    pub fn end(&self) -> Result<(), CodesError> {
        let mut book = self.lock();
        let mut next = book.clone();
        next.end();
        self.persist(&next)?;
        *book = next;
        Ok(())
    }

    /// Begins an attempt; the failure it provisionally counts is durable before the handshake goes on.
    pub fn begin_attempt(&self, source: IpAddr) -> Result<Attempt, AttemptError> {
        let mut book = self.lock();
        let attempt = book
            .begin_attempt(source, SystemTime::now())
            .map_err(AttemptError::Refused)?;
        self.persist(&book).map_err(AttemptError::Store)?;
        Ok(attempt)
    }

    pub fn succeeded(&self, attempt: &Attempt) -> Result<(), StoreError> {
        let mut book = self.lock();
        book.succeeded(attempt);
        self.persist(&book)
    }
}
