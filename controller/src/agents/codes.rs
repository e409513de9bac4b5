//! The install-code book, persisted: every change is flushed before it is
//! acknowledged. A guess is written under the book's lock and flushed after
//! it, so concurrent enrolments share one flush.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use de_install_codes::{
    Attempt, Challenge, ChannelBinding, CodeBook, CodeStatus, IssuedCode, Refusal,
};

use crate::store::{Store, StoreError, StoreExt, Tree, Written};

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

    /// Writes `book`; durable once the mark is synced.
    fn apply(&self, book: &CodeBook) -> Result<Written, StoreError> {
        self.store.apply_json(Tree::Meta, KEY, book)
    }

    /// A new code replacing any other, admitting `nodes` nodes (`None`: any
    /// number until it expires or is ended); durable when this returns.
    pub fn issue(&self, ttl: Duration, nodes: Option<u32>) -> Result<IssuedCode, CodesError> {
        let mut book = self.lock();
        let mut next = book.clone();
        let issued = next.issue(SystemTime::now(), ttl, nodes)?;
        self.persist(&next)?;
        *book = next;
        Ok(issued)
    }

    pub fn active(&self) -> Option<IssuedCode> {
        self.lock().active(SystemTime::now())
    }

    /// The last code issued, whatever its state, with its failed guesses and nodes.
    pub fn status(&self) -> Option<CodeStatus> {
        self.lock().status(SystemTime::now())
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

    /// Answers an agent's first handshake message; a guess it counts is
    /// durable before the reply (which lets the peer test the code) is sent.
    pub fn challenge(
        &self,
        source: IpAddr,
        binding: ChannelBinding,
        msg_a: &[u8],
    ) -> Result<Challenge, AttemptError> {
        let (challenge, written) = {
            let mut book = self.lock();
            let challenge = book
                .challenge(source, SystemTime::now(), binding, msg_a)
                .map_err(AttemptError::Refused)?;
            let written = if challenge.attempt.counted() {
                Some(self.apply(&book).map_err(AttemptError::Store)?)
            } else {
                None
            };
            (challenge, written)
        };
        if let Some(w) = written {
            self.store.sync(w).map_err(AttemptError::Store)?;
        }
        Ok(challenge)
    }

    /// The agent proved the code: admits one node (durable when this
    /// returns), or says why it may not enrol.
    pub fn admit(&self, attempt: &Attempt) -> Result<Result<(), Refusal>, StoreError> {
        let mut book = self.lock();
        let mut next = book.clone();
        let admitted = next.admit(attempt, SystemTime::now());
        self.persist(&next)?;
        *book = next;
        Ok(admitted)
    }

    /// The attempt ended without proving the code; its guess stays counted.
    pub fn failed(&self, attempt: &Attempt) {
        self.lock().failed(attempt);
    }
}
