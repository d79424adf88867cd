module lazysnap.test/pause

go 1.19
