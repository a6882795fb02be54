//! Request metering: one token bucket per kind of request (heartbeats,
//! world asks, history pages), so that no player can monopolise the world
//! actor or the store's reader thread, and the answer to a refused request.
//!
//! It owns the buckets and the verdict on each request. It must never
//! meter chat lines (each channel has its cooldown, in `chat`) nor read a
//! clock other than tokio's, so tests can pause time.

use std::time::Duration;

use bytes::Bytes;
use guildchat_protocol::{codec, pb, ClientMsg, MsgType, ResCode};
use tokio::time::Instant;

use super::replies::duration_ms;
use crate::config::RatesConfig;

/// The answer to a request refused by its rate limit. Only metered
/// requests reach here; each gets its own reply type, carrying the wait.
pub(super) fn rate_limited_reply(req: &ClientMsg, mask: u32, wait: Duration) -> Bytes {
    let retry_after_ms = duration_ms(wait);
    match req {
        // The mask reply also says which mask is in force.
        ClientMsg::SetMask(_) => codec::encode(&pb::ChatMessageSetMaskRep {
            msghead: codec::head(MsgType::ChcSetMaskRep, req.seq()),
            res: ResCode::ResRateLimited as i32,
            mask,
            retry_after_ms,
        }),
        // Logins and chat lines are never metered (see `Class::of`); an
        // error notice, should that ever change.
        ClientMsg::Login(_) | ClientMsg::Chat(_) => codec::encode(&pb::ChatMessageNotifyError {
            msghead: codec::head(MsgType::ChcNotifyError, req.seq()),
            res: ResCode::ResRateLimited as i32,
            ..Default::default()
        }),
        other => other.refusal(ResCode::ResRateLimited, retry_after_ms),
    }
}

/// Kinds of metered request, by what they cost the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    /// Heartbeats: answered by this actor alone.
    Cheap,
    /// Set-mask (a world round trip) and online (a reply).
    World,
    /// History pages: a read on the store's single reader thread.
    History,
}

impl Class {
    /// Chat lines are not metered here (each channel has its cooldown), nor
    /// a second login (answered at once, and a client error).
    pub(super) fn of(req: &ClientMsg) -> Option<Class> {
        match req {
            ClientMsg::Heartbeat(_) => Some(Class::Cheap),
            ClientMsg::SetMask(_) | ClientMsg::Online(_) => Some(Class::World),
            // Block requests write to (or read from) the store.
            ClientMsg::History(_)
            | ClientMsg::Block(_)
            | ClientMsg::Unblock(_)
            | ClientMsg::BlockList(_) => Some(Class::History),
            ClientMsg::Login(_) | ClientMsg::Chat(_) => None,
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// (requests per second, burst) from the config.
    fn limit(self, rates: &RatesConfig) -> (u32, u32) {
        match self {
            Class::Cheap => (rates.heartbeat_per_sec, rates.heartbeat_burst),
            Class::World => (rates.world_per_sec, rates.world_burst),
            Class::History => (rates.history_per_sec, rates.history_burst),
        }
    }
}

/// What a bucket says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    Go,
    /// Refused; the next request of its kind is accepted after this long.
    Wait(Duration),
    /// Refused, and the player has ignored the limit long enough: close.
    Kick,
}

/// A token bucket in one instant (the generic cell rate algorithm): `tat`
/// is when the bucket would be full again. A request is allowed while
/// `tat` is less than `burst - 1` intervals ahead of now, and moves it one
/// interval on.
///
/// Hand-rolled rather than `governor`: it reads tokio's clock, so tests can
/// pause it, and it is one `Instant` where a governor direct limiter
/// carries its own clock and state, one per class per player (see Memory
/// layout in ARCHITECTURE.md).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tat: Instant,
}

impl Bucket {
    /// A full bucket.
    fn new(now: Instant) -> Bucket {
        Bucket { tat: now }
    }

    /// Takes one token at `now`, refilled at `per_sec` up to `burst`; on
    /// refusal, how long until the next token.
    fn take(&mut self, now: Instant, per_sec: u32, burst: u32) -> Result<(), Duration> {
        let interval = Duration::from_secs(1) / per_sec.max(1);
        let tolerance = interval * burst.max(1).saturating_sub(1);
        let wait = self
            .tat
            .saturating_duration_since(now)
            .saturating_sub(tolerance);
        if !wait.is_zero() {
            return Err(wait);
        }
        self.tat = self.tat.max(now) + interval;
        Ok(())
    }
}

/// One kind's bucket, and a second that counts its refusals: that one
/// refills `kick_factor - 1` times as fast and holds `kick_factor - 1`
/// bursts, so it only runs dry when a player keeps sending more than
/// `kick_factor` times the limit.
#[derive(Debug, Clone, Copy)]
struct Metered {
    tokens: Bucket,
    refusals: Bucket,
}

/// A player's request buckets, each made on the first request of its kind.
/// Boxed in the actor (see Memory layout in ARCHITECTURE.md).
#[derive(Debug, Default)]
pub(super) struct Rates {
    classes: [Option<Metered>; 3],
}

impl Rates {
    pub(super) fn check(&mut self, class: Class, config: &RatesConfig, now: Instant) -> Verdict {
        let metered = self.classes[class.index()].get_or_insert(Metered {
            tokens: Bucket::new(now),
            refusals: Bucket::new(now),
        });
        let (per_sec, burst) = class.limit(config);
        let Err(wait) = metered.tokens.take(now, per_sec, burst) else {
            return Verdict::Go;
        };
        let over = config.kick_factor.saturating_sub(1).max(1);
        match metered.refusals.take(
            now,
            per_sec.saturating_mul(over),
            burst.saturating_mul(over),
        ) {
            Ok(()) => Verdict::Wait(wait),
            Err(_) => Verdict::Kick,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn request_buckets_stay_small() {
        assert_eq!(std::mem::size_of::<Option<Box<Rates>>>(), 8);
        assert!(std::mem::size_of::<Rates>() <= 96);
    }

    #[tokio::test(start_paused = true)]
    async fn a_bucket_allows_its_burst_then_its_rate() {
        let mut b = Bucket::new(Instant::now());
        // 2 per second, burst 5.
        for i in 0..5 {
            assert_eq!(b.take(Instant::now(), 2, 5), Ok(()), "request {i}");
        }
        assert_eq!(b.take(Instant::now(), 2, 5), Err(ms(500)));
        tokio::time::advance(ms(200)).await;
        assert_eq!(b.take(Instant::now(), 2, 5), Err(ms(300)));
        tokio::time::advance(ms(300)).await;
        assert_eq!(b.take(Instant::now(), 2, 5), Ok(()));
        assert_eq!(b.take(Instant::now(), 2, 5), Err(ms(500)));
        // A steady 2 per second is always allowed.
        for _ in 0..20 {
            tokio::time::advance(ms(500)).await;
            assert_eq!(b.take(Instant::now(), 2, 5), Ok(()));
        }
        // A long pause refills the burst, and no more.
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..5 {
            assert_eq!(b.take(Instant::now(), 2, 5), Ok(()));
        }
        assert!(b.take(Instant::now(), 2, 5).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn refused_requests_close_only_past_the_kick_factor() {
        let config = RatesConfig::default();
        let (per_sec, burst) = Class::History.limit(&config);
        assert_eq!((per_sec, burst), (2, 5));
        let step = ms(1000 / (per_sec as u64 * 4));

        // Four times the limit, for a minute: refused, never closed.
        let mut rates = Rates::default();
        let (mut go, mut wait) = (0, 0);
        for _ in 0..(60 * per_sec * 4) {
            match rates.check(Class::History, &config, Instant::now()) {
                Verdict::Go => go += 1,
                Verdict::Wait(d) => {
                    assert!(d > Duration::ZERO && d <= ms(500));
                    wait += 1
                }
                Verdict::Kick => panic!("closed at four times the limit"),
            }
            tokio::time::advance(step).await;
        }
        assert!((120..=126).contains(&go), "{go}");
        assert!(wait > 300, "{wait}");

        // Ten times the limit: closed within a few seconds.
        let mut rates = Rates::default();
        let step = ms(1000 / (per_sec as u64 * 10));
        let mut sent = 0;
        loop {
            sent += 1;
            if rates.check(Class::History, &config, Instant::now()) == Verdict::Kick {
                break;
            }
            assert!(sent < 200, "never closed");
            tokio::time::advance(step).await;
        }
        // burst + 4 bursts of refusals, plus what refilled meanwhile.
        assert!(sent > 25, "{sent}");

        // Classes are independent: history abuse leaves heartbeats alone.
        assert_eq!(
            rates.check(Class::Cheap, &config, Instant::now()),
            Verdict::Go
        );
    }
}
