//! The connection's outbound frame queue: bounded, and allocated as it
//! fills rather than up front.
//!
//! It owns the queued items and the writer's waker. It must never wait on
//! the sending side and never hold its lock across anything but a push or
//! a pop. Full-queue behaviour: [`Sender::try_send`] refuses the item
//! ([`TrySendError::Full`]) and [`super::outbound::ConnTx`] applies the
//! slow-consumer policy.
//!
//! Why not a general channel: an idle connection spends its life with an
//! empty queue, and tokio's bounded mpsc allocates a block of 32 slots and
//! cache-padded state per channel before anything is sent (about 1.5 KB a
//! connection, measured with heaptrack). Here an empty queue holds no
//! buffer, one `Arc` holds everything, and waiting registers the writer's
//! waker without allocating. The one receiver is the connection's writer.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;

use futures_util::task::AtomicWaker;

/// Past this many slots, an empty queue gives its buffer back down to it
/// at the next [`Sender::trim`]: a burst does not keep its memory for the
/// rest of the connection.
const KEEP_SLOTS: usize = 8;

struct Inner<T> {
    items: Mutex<VecDeque<T>>,
    /// `items.len()`, written under the lock and read without it: the
    /// fan-out asks every recipient's queue how full it is before queuing,
    /// and taking the lock twice per delivery cost as much as the push.
    len: AtomicUsize,
    /// The receiver's waker: woken by a push into an empty queue and by
    /// the last sender.
    waker: AtomicWaker,
    senders: AtomicUsize,
    receiver_gone: AtomicBool,
    cap: usize,
}

impl<T> Inner<T> {
    fn items(&self) -> MutexGuard<'_, VecDeque<T>> {
        // A panic while holding the lock leaves a valid VecDeque.
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why an item was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError<T> {
    /// `cap` items are queued.
    Full(T),
    /// The receiver is gone.
    Closed(T),
}

/// A bounded queue of at most `cap` items (at least 1).
pub fn channel<T>(cap: usize) -> (Sender<T>, Receiver<T>) {
    let inner = Arc::new(Inner {
        items: Mutex::new(VecDeque::new()),
        len: AtomicUsize::new(0),
        waker: AtomicWaker::new(),
        senders: AtomicUsize::new(1),
        receiver_gone: AtomicBool::new(false),
        cap: cap.max(1),
    });
    (
        Sender {
            inner: inner.clone(),
        },
        Receiver { inner },
    )
}

/// The sending side; cheap to clone.
pub struct Sender<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Sender<T> {
    /// Queues `item` unless the queue is full or the receiver gone.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        if self.inner.receiver_gone.load(Ordering::Acquire) {
            return Err(TrySendError::Closed(item));
        }
        let was_empty = {
            let mut items = self.inner.items();
            if items.len() >= self.inner.cap {
                return Err(TrySendError::Full(item));
            }
            let was_empty = items.is_empty();
            items.push_back(item);
            self.inner.len.store(items.len(), Ordering::Release);
            was_empty
        };
        // Only the push into an empty queue wakes: the receiver never waits
        // while anything is queued (`recv` looks before it registers and
        // again after), so it will reach this item without a wake-up. One
        // wake per batch instead of one per frame.
        if was_empty {
            self.inner.waker.wake();
        }
        Ok(())
    }

    /// How many items are queued, without taking the lock: exact as of
    /// the last push or pop.
    pub fn len(&self) -> usize {
        self.inner.len.load(Ordering::Acquire)
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bound.
    pub fn max_capacity(&self) -> usize {
        self.inner.cap
    }

    /// Gives an empty queue's buffer back down to [`KEEP_SLOTS`]. Called
    /// from the world's once-a-second tick, not on every drain: under
    /// steady fan-out a queue empties after every batch, and shrinking it
    /// each time made it grow again (two reallocations) for the next one.
    pub fn trim(&self) {
        let mut items = self.inner.items();
        if items.is_empty() && items.capacity() > KEEP_SLOTS {
            items.shrink_to(KEEP_SLOTS);
        }
    }

    /// Whether the receiver is gone.
    pub fn is_closed(&self) -> bool {
        self.inner.receiver_gone.load(Ordering::Acquire)
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.inner.senders.fetch_add(1, Ordering::Relaxed);
        Sender {
            inner: self.inner.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.inner.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The receiver learns that nothing more will come.
            self.inner.waker.wake();
        }
    }
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("cap", &self.inner.cap)
            .finish_non_exhaustive()
    }
}

/// The receiving side: the connection's writer.
pub struct Receiver<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Receiver<T> {
    /// The next item, if one is queued.
    pub fn try_recv(&mut self) -> Option<T> {
        let mut items = self.inner.items();
        let item = items.pop_front();
        self.inner.len.store(items.len(), Ordering::Release);
        item
    }

    /// The next item, waiting for one; `None` once every sender is gone
    /// and the queue is empty.
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| {
            if let Some(item) = self.try_recv() {
                return Poll::Ready(Some(item));
            }
            self.inner.waker.register(cx.waker());
            // Looked at again after registering: a push or a last drop in
            // between woke the old waker, or none.
            if let Some(item) = self.try_recv() {
                return Poll::Ready(Some(item));
            }
            if self.inner.senders.load(Ordering::Acquire) == 0 {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.inner.items().is_empty()
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.inner.receiver_gone.store(true, Ordering::Release);
        // What was queued goes now, not with the last sender.
        let mut items = self.inner.items();
        std::mem::take(&mut *items);
        self.inner.len.store(0, Ordering::Release);
    }
}

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("cap", &self.inner.cap)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    #[test]
    fn it_holds_at_most_cap_items_in_order() {
        let (tx, mut rx) = channel(2);
        assert_eq!(tx.try_send(1), Ok(()));
        assert_eq!(tx.try_send(2), Ok(()));
        assert_eq!(tx.try_send(3), Err(TrySendError::Full(3)));
        assert_eq!(tx.len(), 2);
        assert_eq!(rx.try_recv(), Some(1));
        assert_eq!(tx.try_send(4), Ok(()));
        assert_eq!(
            (rx.try_recv(), rx.try_recv(), rx.try_recv()),
            (Some(2), Some(4), None)
        );
        assert!(rx.is_empty() && tx.is_empty());
    }

    #[test]
    fn an_empty_queue_holds_no_buffer_and_gives_a_bursts_back() {
        let (tx, mut rx) = channel(100);
        assert_eq!(rx.inner.items().capacity(), 0);
        for i in 0..100 {
            tx.try_send(i).unwrap();
        }
        while rx.try_recv().is_some() {}
        assert!(rx.inner.items().capacity() >= 100, "kept until trimmed");
        tx.try_send(0).unwrap();
        tx.trim();
        assert!(
            rx.inner.items().capacity() >= 100,
            "a non-empty queue is not trimmed"
        );
        rx.try_recv();
        tx.trim();
        assert!(rx.inner.items().capacity() <= KEEP_SLOTS);
    }

    #[test]
    fn a_gone_receiver_refuses_and_frees_what_was_queued() {
        let (tx, rx) = channel(4);
        let item = Arc::new(());
        tx.try_send(item.clone()).unwrap();
        drop(rx);
        assert_eq!(Arc::strong_count(&item), 1, "freed with the receiver");
        assert!(tx.is_closed());
        assert!(matches!(tx.try_send(item), Err(TrySendError::Closed(_))));
    }

    #[tokio::test]
    async fn recv_waits_for_a_push_and_ends_after_the_last_sender() {
        let (tx, mut rx) = channel(4);
        let tx2 = tx.clone();
        let waiting = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(i) = rx.recv().await {
                got.push(i);
            }
            got
        });
        tokio::task::yield_now().await;
        tx.try_send(1).unwrap();
        tokio::task::yield_now().await;
        tx2.try_send(2).unwrap();
        drop(tx);
        tokio::task::yield_now().await;
        tx2.try_send(3).unwrap();
        drop(tx2);
        assert_eq!(waiting.await.unwrap(), vec![1, 2, 3]);
    }

    /// A waker that counts its wake-ups.
    struct Count(AtomicUsize);

    impl futures_util::task::ArcWake for Count {
        fn wake_by_ref(me: &Arc<Self>) {
            me.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_waiting_receiver_is_woken_and_reaches_every_item_pushed_while_it_waited() {
        let (tx, mut rx) = channel(8);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = futures_util::task::waker(count.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        let woken = || count.0.load(Ordering::SeqCst);
        {
            let recv = std::pin::pin!(rx.recv());
            assert!(recv.poll(&mut cx).is_pending());
        }
        for i in 0..3 {
            tx.try_send(i).unwrap();
        }
        // One wake either way: `AtomicWaker` forgets its waker when woken, so
        // waking only from an empty queue saves atomics, not wake-ups.
        assert_eq!(woken(), 1, "woken by the first push");
        let mut got = Vec::new();
        loop {
            let recv = std::pin::pin!(rx.recv());
            match recv.poll(&mut cx) {
                Poll::Ready(Some(i)) => got.push(i),
                Poll::Ready(None) => unreachable!("a sender is alive"),
                Poll::Pending => break,
            }
        }
        assert_eq!(got, vec![0, 1, 2]);
        tx.try_send(3).unwrap();
        assert_eq!(woken(), 2, "a push into the emptied queue wakes again");
        assert_eq!(rx.try_recv(), Some(3));
    }
}
