// VP9 key-frame SVC (L3T3_KEY) through the focus, in Chromium: the story is in svc-story.mjs.
//
// Run: scripts/in-netns.sh node --test web/test/svc-vp9.test.mjs (after scripts/setup.sh and
// cargo build -p weir-focus).

import { svcStory } from "./svc-story.mjs";

svcStory({ codec: "video/VP9", mode: "L3T3_KEY" });
