//! Per-thread scratch buffers reused from call to call: a layer's temporaries (im2col
//! matrices, gathered output gradients) are taken from this thread's pool and given back when
//! the call ends, so that a chunk's pass neither allocates nor clears them again (clearing
//! and page-faulting fresh buffers was ~9 % of a ResNet-20 profile).

use super::Real;
use std::any::Any;
use std::cell::RefCell;

thread_local! {
    /// This thread's free buffer sets, one entry per element type in use.
    static POOL: RefCell<Vec<Box<dyn Any>>> = const { RefCell::new(Vec::new()) };
}

/// Three buffers from this thread's pool (or new, empty ones); [`Scratch::give_back`] returns
/// them. Their contents are whatever the last user left: callers write every entry of a slice
/// from [`Scratch::get`] before reading it.
pub(crate) struct Scratch<T: Real> {
    bufs: [Vec<T>; 3],
}

impl<T: Real> Scratch<T> {
    /// A set from the pool, or a new one (a layer nested in another's pass gets a new one).
    pub(crate) fn take() -> Self {
        let found = POOL.with(|p| {
            let mut p = p.borrow_mut();
            let i = p.iter().position(|b| b.is::<Self>())?;
            p.swap_remove(i).downcast::<Self>().ok()
        });
        found.map_or_else(
            || Scratch {
                bufs: [Vec::new(), Vec::new(), Vec::new()],
            },
            |b| *b,
        )
    }

    /// The first `lens[i]` entries of each buffer `i` (grown with zeros when shorter).
    pub(crate) fn slices(&mut self, lens: [usize; 3]) -> [&mut [T]; 3] {
        for (b, &len) in self.bufs.iter_mut().zip(&lens) {
            if b.len() < len {
                b.resize(len, T::zero());
            }
        }
        let [a, b, c] = &mut self.bufs;
        [&mut a[..lens[0]], &mut b[..lens[1]], &mut c[..lens[2]]]
    }

    /// Return the set to this thread's pool.
    pub(crate) fn give_back(self) {
        POOL.with(|p| p.borrow_mut().push(Box::new(self)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_by_the_same_thread() {
        let mut s = Scratch::<f32>::take();
        s.slices([0, 10, 0])[1].fill(7.0);
        let p = s.bufs[1].as_ptr();
        s.give_back();
        let mut s = Scratch::<f32>::take();
        assert_eq!(s.bufs[1].as_ptr(), p);
        // Shorter requests see the old contents, longer ones grow.
        let [a, b, c] = s.slices([3, 4, 12]);
        assert_eq!(b, &[7.0; 4]);
        assert_eq!((a.len(), c.len()), (3, 12));
        s.give_back();
        // f64 buffers are a different set.
        let s64 = Scratch::<f64>::take();
        assert!(s64.bufs[1].is_empty());
        s64.give_back();
    }
}
