using Akka.Actor;
using Akka.TestKit;
using Gateway.Actors.Bitmaps;
using Gateway.Backends;
using Xunit;
using Xunit.Abstractions;

namespace Gateway.Tests.Bitmaps;

/// <summary>
/// How first touches reach the bitmaps actor: batched in the <see cref="DirtyTracker"/>, one
/// message and one completion per batch (issue 19: bitmaps nearly free).
/// </summary>
[Collection(GatedJournalCollection.Name)]
public sealed class DirtyTrackerTests(ITestOutputHelper output) : Akka.TestKit.Xunit2.TestKit(BitmapsActorTests.Config, output)
{
    private const int K64 = 64 << 10;
    private static readonly TimeSpan Patience = TimeSpan.FromSeconds(10);

    [Fact]
    public void First_touches_made_before_the_actor_takes_them_cost_one_message_and_share_one_completion()
    {
        TestProbe actor = CreateTestProbe();
        var tracker = new DirtyTracker { Actor = actor.Ref };

        Task[] marks = [.. Enumerable.Range(0, 20).Select(i => tracker.MarkAsync(i * 2L * K64, 4096))];
        actor.ExpectMsg<CommitMarks>(Patience);
        actor.ExpectNoMsg(TimeSpan.FromMilliseconds(300)); // not one message per first touch
        Assert.Single(marks.Distinct()); // nor one completion each
        Assert.False(marks[0].IsCompleted);

        Assert.True(tracker.TryTakePending(out List<(long Offset, long Length)>? ranges, out TaskCompletionSource? done));
        Assert.Equal(20, ranges.Count);
        Task later = tracker.MarkAsync(K64, 4096); // arrives while the batch is being persisted
        actor.ExpectNoMsg(TimeSpan.FromMilliseconds(100)); // the actor takes it when its commit ends
        Assert.NotSame(marks[0], later);
        done.SetResult();
        Assert.True(marks[0].IsCompletedSuccessfully);
        Assert.False(later.IsCompleted);

        Assert.False(tracker.ReleaseIfIdle()); // something is pending: the actor must stay called
        Assert.True(tracker.TryTakePending(out _, out TaskCompletionSource? next));
        next.SetResult();
        Assert.True(later.IsCompletedSuccessfully);
        Assert.True(tracker.ReleaseIfIdle());
        _ = tracker.MarkAsync(3L * K64, 4096); // the first of a new batch calls the actor again
        actor.ExpectMsg<CommitMarks>(Patience);
    }

    [Fact]
    public async Task A_first_touch_after_the_bitmaps_actor_stopped_for_good_fails_instead_of_waiting_forever()
    {
        var tracker = new DirtyTracker();
        IActorRef actor = Sys.ActorOf(BitmapsActor.Props("stopped", 64 << 20, tracker));
        tracker.Actor = actor;
        BitmapResult added = await actor.Ask<BitmapResult>(new AddBitmap("stopped", "b", K64, true), Patience);
        Assert.Null(added.Error);
        await tracker.MarkAsync(0, 4096).WaitAsync(Patience);

        Watch(actor);
        actor.Tell(PoisonPill.Instance);
        ExpectTerminated(actor);
        // A writer that read the view just before the stop: its mark must not go to dead letters.
        var refused = await Assert.ThrowsAsync<BlockDeviceException>(() => tracker.MarkAsync(4L * K64, 4096).WaitAsync(Patience));
        Assert.Equal(BlockErrorKind.Shutdown, refused.Kind);
    }
}
