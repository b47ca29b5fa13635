//! Sets of pages of one memory region, one bit per page, in the layout of KVM's dirty log.

/// A set of page indexes below a fixed count.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageSet {
    words: Vec<u64>,
    pages: usize,
}

impl PageSet {
    /// An empty set for a region of `pages` pages.
    pub fn new(pages: usize) -> Self {
        Self { words: vec![0; pages.div_ceil(64)], pages }
    }

    /// The set whose bitmap is `words` (bit `i % 64` of word `i / 64` for page `i`), as KVM's dirty
    /// log and vm-memory's dirty bitmap give it; bits past `pages` are dropped.
    pub fn from_words(mut words: Vec<u64>, pages: usize) -> Self {
        words.resize(pages.div_ceil(64), 0);
        let mut set = Self { words, pages };
        set.clear_tail();
        set
    }

    /// The number of pages of the region (not of the set).
    pub fn capacity(&self) -> usize {
        self.pages
    }

    /// Adds `page`.
    pub fn insert(&mut self, page: usize) {
        debug_assert!(page < self.pages);
        self.words[page / 64] |= 1 << (page % 64);
    }

    /// Adds every page of `range` (clipped to the region).
    pub fn insert_range(&mut self, range: std::ops::Range<usize>) {
        for page in range.start..range.end.min(self.pages) {
            self.insert(page);
        }
    }

    /// Whether `page` is in the set.
    pub fn contains(&self, page: usize) -> bool {
        page < self.pages && self.words[page / 64] & (1 << (page % 64)) != 0
    }

    /// Adds every page of `other` (a set over the same region).
    pub fn union_with(&mut self, other: &PageSet) {
        self.union_with_words(&other.words);
    }

    /// Adds every page whose bit is set in `words` (a bitmap as in [`from_words`](Self::from_words)).
    pub fn union_with_words(&mut self, words: &[u64]) {
        for (mine, theirs) in self.words.iter_mut().zip(words) {
            *mine |= theirs;
        }
        self.clear_tail();
    }

    /// Whether no page is in the set.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// How many pages are in the set.
    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The pages in the set, in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(index, &word)| {
            let mut rest = word;
            std::iter::from_fn(move || {
                (rest != 0).then(|| {
                    let bit = rest.trailing_zeros() as usize;
                    rest &= rest - 1;
                    index * 64 + bit
                })
            })
        })
    }

    fn clear_tail(&mut self) {
        if self.pages % 64 != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1 << (self.pages % 64)) - 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_hold_pages_in_order_and_ignore_bits_past_the_region() {
        let mut set = PageSet::from_words(vec![0b1010, 1 << 63, u64::MAX], 130);
        assert_eq!(set.iter().collect::<Vec<_>>(), [1, 3, 127, 128, 129]);
        assert_eq!(set.len(), 5);
        set.insert(64);
        set.insert_range(125..200);
        assert!(set.contains(64) && set.contains(126) && !set.contains(130) && !set.contains(2));
        let mut other = PageSet::new(130);
        assert!(other.is_empty());
        other.union_with(&set);
        assert_eq!(other, set);
        assert_eq!(other.capacity(), 130);
    }
}
