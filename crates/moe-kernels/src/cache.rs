//! A map whose values are built once per key, even when several threads ask at once: the
//! process-wide PTX and loaded-module caches (see `crate::device`) are two of them.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Values built on first use, one build per key, kept for the life of the map (no eviction).
///
/// Each key has a slot of its own. The map's lock is held only to find or add a slot; the
/// slot's lock is held while its value is built. So a caller asking for a key that another
/// thread is building waits for that build instead of repeating it (one NVRTC compilation per
/// module even when every rank asks at once), while other keys build in parallel (ranks load
/// their modules on their own devices concurrently). A slot is a `Mutex<Option<V>>` rather than
/// a `OnceLock<V>` because a build can fail: the error goes to the caller that built, the slot
/// stays empty and the next caller builds again (`OnceLock::get_or_try_init` is not stable).
pub(crate) struct OnceMap<K, V> {
    slots: Mutex<HashMap<K, Slot<V>>>,
}

type Slot<V> = Arc<Mutex<Option<V>>>;

impl<K, V> Default for OnceMap<K, V> {
    fn default() -> Self {
        OnceMap {
            slots: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash, V: Clone> OnceMap<K, V> {
    /// The value of `key`, built by `build` if no caller has built it yet.
    pub(crate) fn get_or_try_init<E>(&self, key: K, build: impl FnOnce() -> Result<V, E>) -> Result<V, E> {
        let slot = lock(&self.slots).entry(key).or_default().clone();
        let mut value = lock(&slot);
        if let Some(v) = value.as_ref() {
            return Ok(v.clone());
        }
        let built = build()?;
        *value = Some(built.clone());
        Ok(built)
    }
}

/// A lock whose holder panicked (a build that panicked) still guards consistent data: the slot
/// was left empty, or the map was not changed.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Barrier, mpsc};
    use std::thread;
    use std::time::Duration;

    use super::*;

    #[test]
    fn each_key_is_built_once_and_later_callers_get_the_same_value() {
        let map: OnceMap<u32, Arc<String>> = OnceMap::default();
        let builds = AtomicUsize::new(0);
        let build = |text: &str| {
            builds.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ()>(Arc::new(text.to_string()))
        };
        let first = map.get_or_try_init(1, || build("one")).unwrap();
        let again = map.get_or_try_init(1, || build("not built")).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(*again, "one");
        assert_eq!(builds.load(Ordering::SeqCst), 1);
        let other = map.get_or_try_init(2, || build("two")).unwrap();
        assert_eq!(*other, "two");
        assert_eq!(builds.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn callers_racing_for_one_key_share_one_build() {
        let map: OnceMap<&str, Arc<u64>> = OnceMap::default();
        let builds = AtomicUsize::new(0);
        let start = Barrier::new(8);
        let values: Vec<Arc<u64>> = thread::scope(|s| {
            let workers: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        map.get_or_try_init("module", || {
                            builds.fetch_add(1, Ordering::SeqCst);
                            // Long enough that the other callers arrive during the build.
                            thread::sleep(Duration::from_millis(50));
                            Ok::<_, ()>(Arc::new(7))
                        })
                        .unwrap()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        assert_eq!(builds.load(Ordering::SeqCst), 1);
        assert!(values.iter().all(|v| Arc::ptr_eq(v, &values[0])));
    }

    #[test]
    fn a_failed_build_is_not_kept_and_the_next_caller_builds_again() {
        let map: OnceMap<u32, u32> = OnceMap::default();
        assert_eq!(map.get_or_try_init(1, || Err("nvrtc missing")), Err("nvrtc missing"));
        assert_eq!(map.get_or_try_init(1, || Ok::<_, &str>(5)), Ok(5));
        assert_eq!(map.get_or_try_init(1, || Err("not called")), Ok(5));
    }

    #[test]
    fn a_panicking_build_leaves_the_key_buildable() {
        let map: OnceMap<u32, u32> = OnceMap::default();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            map.get_or_try_init(1, || -> Result<u32, ()> { panic!("build failed") })
        }));
        assert!(panicked.is_err());
        assert_eq!(map.get_or_try_init(1, || Ok::<_, ()>(3)), Ok(3));
    }

    #[test]
    fn other_keys_build_while_one_is_being_built() {
        let map = &OnceMap::<u32, u32>::default();
        let (release, released) = mpsc::channel::<()>();
        let (started, has_started) = mpsc::channel::<()>();
        thread::scope(|s| {
            let slow = s.spawn(move || {
                map.get_or_try_init(1, || {
                    started.send(()).unwrap();
                    // Finishes when the main thread has built key 2; a map locked for the
                    // whole build would keep it from doing so until this times out.
                    released
                        .recv_timeout(Duration::from_secs(30))
                        .map(|()| 1)
                        .map_err(|_| "key 2 waited for key 1's build")
                })
            });
            has_started.recv().unwrap();
            assert_eq!(map.get_or_try_init(2, || Ok::<_, &str>(2)), Ok(2));
            release.send(()).unwrap();
            assert_eq!(slow.join().unwrap(), Ok(1));
        });
    }
}
